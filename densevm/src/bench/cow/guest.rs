//! The guest-observed cases of `densevm bench cow`: a pair of workload VMs, A's
//! pages prepared, and the first pass of A's rewrite loop read from its report page.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::breakdown::Samples;
use super::prepare::{prepare, wait_ksm_merged, Prep};
use super::{check_interrupt, rt, spec, Params};
use crate::bench::ksm::KsmControl;
use crate::commands::CommandError;
use vmm::guest_ram::RamPolicy;
use vmm::host::Host;
use vmm::vm::VmState;
use vmm::workload::abi::{WorkloadConfig, WorkloadReport};
use vmm::workload::layout::WorkloadLayout;

/// Interval between reads of A's report page.
const POLL: Duration = Duration::from_millis(1);

/// One report read that is not torn by a concurrent guest update.
fn report(host: &Host, id: &str) -> Result<WorkloadReport, CommandError> {
    let vm = host.vm(id)?;
    let mut last = vm.workload_report().ok_or_else(|| rt(format!("{id}: no workload report")))?;
    for _ in 0..16 {
        let again = vm.workload_report().ok_or_else(|| rt(format!("{id}: no workload report")))?;
        if again == last {
            break;
        }
        last = again;
    }
    Ok(last)
}

fn poll_until(
    host: &mut Host,
    ids: &[&str],
    timeout: Duration,
    what: &str,
    done: impl Fn(&Host) -> bool,
) -> Result<(), CommandError> {
    let deadline = Instant::now() + timeout;
    while !done(host) {
        check_interrupt()?;
        for id in ids {
            host.vm_mut(id)?.handle_events();
        }
        if Instant::now() > deadline {
            return Err(rt(format!("{what} within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The result of one guest-observed case.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct GuestCase {
    pub(super) name: &'static str,
    pub(super) what: &'static str,
    pub(super) pages: u64,
    pub(super) pages_prepared: u64,
    pub(super) pages_measured: u64,
    pub(super) mean_ns: f64,
    /// Median of the per-poll interval means, weighted by pages.
    pub(super) median_ns: f64,
    pub(super) max_ns: f64,
    pub(super) intervals: usize,
    pub(super) tsc_khz: u64,
    pub(super) cow_copies: u64,
    pub(super) cow_reuses: u64,
    /// Merged frames A's pages took over in the background while they were
    /// prepared (before the measured writes).
    pub(super) cow_background_reuses: u64,
    /// userfaultfd faults during the measured pass (B is paused meanwhile:
    /// all of them are A's writes that still faulted).
    pub(super) faulted_writes: u64,
    pub(super) protect_faults: u64,
    pub(super) mismatches: u64,
    pub(super) exit_reasons: Vec<String>,
    /// The handler's stages of the measured faults (densevm's cases).
    #[serde(skip)]
    pub(super) samples: Samples,
}

fn weighted_median(samples: &mut [(f64, u64)]) -> f64 {
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = samples.iter().map(|s| s.1).sum();
    let mut seen = 0;
    for (v, w) in samples.iter() {
        seen += w;
        if seen * 2 >= total {
            return *v;
        }
    }
    f64::NAN
}

/// Runs one guest-observed case on a fresh pair of VMs A and B (removed afterwards).
pub(super) fn guest_case(
    host: &mut Host,
    name: &'static str,
    prep: Prep,
    p: Params,
    ksm: Option<&mut KsmControl>,
) -> Result<GuestCase, CommandError> {
    let ids = [format!("cow-{name}-a"), format!("cow-{name}-b")];
    let ram = if prep == Prep::Ksm { RamPolicy::Anonymous { mergeable: true } } else { RamPolicy::Managed };
    for (i, id) in ids.iter().enumerate() {
        host.create_vm(spec(id.clone(), i as u64 + 1, ram, p))?;
    }
    let res = run_case(host, name, prep, p, [&ids[0], &ids[1]], ksm);
    host.memory().set_background_reuse(true);
    for id in &ids {
        let _ = host.remove_vm(id, None);
    }
    res
}

fn run_case(
    host: &mut Host,
    name: &'static str,
    prep: Prep,
    p: Params,
    ids: [&str; 2],
    ksm: Option<&mut KsmControl>,
) -> Result<GuestCase, CommandError> {
    let mut mem = [0u32; 2];
    for (i, id) in ids.iter().enumerate() {
        if let Some(map) = host.vm(id)?.ram().guest_map() {
            mem[i] = map.vm_id();
        }
        host.vm_mut(id)?.start().map_err(rt)?;
    }
    poll_until(host, &ids, Duration::from_secs(120), "the guests did not fill", |h| {
        ids.iter().all(|id| h.vm(id).map(|v| v.state() != VmState::Running).unwrap_or(true))
    })?;
    for id in ids {
        let vm = host.vm(id)?;
        if vm.state() != VmState::Paused {
            return Err(rt(format!(
                "{id} did not pause after its fill: {:?} {:?}",
                vm.state(),
                vm.timeline().exit_reason
            )));
        }
    }
    let vm = host.vm(ids[0])?;
    let layout = vm.workload().ok_or_else(|| rt("no workload layout"))?.layout;
    let cfg: WorkloadConfig = vm.ram().memory().read_obj(GuestAddress(WorkloadLayout::config_gpa(0))).map_err(rt)?;
    let (first, n) = ((layout.data_gpa / 4096) as u32, cfg.npages);
    let data_host = vm.ram().host_addr() + layout.data_gpa;
    let bg0 = host.memory().stats().counters.cow_background_reuses;
    let prepared = match (prep, ksm) {
        (Prep::Ksm, Some(ksm)) => wait_ksm_merged(ksm, data_host, n)?,
        (Prep::Ksm, None) => return Err(rt("the KSM case needs KSM")),
        _ => prepare(host, prep, mem, first, n as u32)?,
    };
    let base = report(host, ids[0])?;
    if base.pages_written != 0 {
        return Err(rt(format!(
            "{}: the guest did not pause before its write loop ({} pages written)",
            ids[0], base.pages_written
        )));
    }
    let s0 = host.memory().stats_exact();
    let c0 = s0.counters;
    memory::uffd::trace::enable(prep != Prep::Ksm);
    let pass = host.vm_mut(ids[0])?.resume().map_err(rt).and_then(|()| first_pass(host, ids[0], n, base));
    memory::uffd::trace::enable(false);
    let batches = memory::uffd::trace::take();
    let (last, mut intervals) = pass?;
    let s1 = host.memory().stats_exact();
    let c1 = s1.counters;
    let measured = last.pages_written;
    if measured == 0 {
        return Err(rt(format!("{}: the guest wrote no page", ids[0])));
    }
    let ns = |cycles: f64| cycles * 1e6 / cfg.tsc_khz as f64;
    let samples = Samples::from_batches(&batches, data_host..data_host + n * 4096, cfg.tsc_khz, None);

    // B resumes too; both run to their end and verify every page.
    if host.vm(ids[1])?.state() == VmState::Paused {
        host.vm_mut(ids[1])?.resume().map_err(rt)?;
    }
    poll_until(host, &ids, Duration::from_secs(p.duration_s + 120), "the guests did not finish", |h| {
        ids.iter().all(|id| h.vm(id).map(|v| matches!(v.state(), VmState::Exited | VmState::Stopped)).unwrap_or(true))
    })?;
    let mut mismatches = 0;
    let mut exit_reasons = Vec::new();
    for id in ids {
        let vm = host.vm(id)?;
        let r = report(host, id)?;
        mismatches += r.mismatches + vm.timeline().mismatch_events;
        exit_reasons.push(vm.timeline().exit_reason.clone().unwrap_or_default());
    }
    Ok(GuestCase {
        name,
        what: match prep {
            Prep::Private => "densevm: private page",
            Prep::Protect => "densevm: write-protected private page (fault round trip only)",
            Prep::Copy => "densevm: frame shared by 2 guest pages (copy)",
            Prep::Reuse => "densevm: sole mapper of a merged frame, reused at its fault",
            Prep::ReuseBackground => "densevm: sole mapper of a merged frame, after background reuse",
            Prep::Ksm => "kernel KSM: anonymous RAM, KSM-merged page (guest-observed)",
        },
        pages: n,
        pages_prepared: prepared,
        pages_measured: measured,
        mean_ns: ns(last.write_first_cycles_sum as f64 / measured as f64),
        median_ns: ns(weighted_median(&mut intervals)),
        max_ns: ns(last.write_first_cycles_max as f64),
        intervals: intervals.len(),
        tsc_khz: cfg.tsc_khz,
        cow_copies: c1.cow_copies - c0.cow_copies,
        cow_reuses: c1.cow_reuses - c0.cow_reuses,
        cow_background_reuses: c0.cow_background_reuses - bg0,
        faulted_writes: s1.uffd_faults - s0.uffd_faults,
        protect_faults: c1.protect_faults - c0.protect_faults,
        mismatches,
        exit_reasons,
        samples,
    })
}

/// The first pass over A's `n` pages after it resumed from `base`: report
/// deltas while `pages_written <= n`; returns the last report of the pass and
/// the per-poll (mean first-store cycles, pages) intervals.
fn first_pass(
    host: &mut Host,
    id: &str,
    n: u64,
    base: WorkloadReport,
) -> Result<(WorkloadReport, Vec<(f64, u64)>), CommandError> {
    let mut last = base;
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupt()?;
        std::thread::sleep(POLL);
        host.vm_mut(id)?.handle_events();
        let r = report(host, id)?;
        if r.pages_written > n {
            break;
        }
        let dp = r.pages_written - last.pages_written;
        if dp > 0 {
            let dc = r.write_first_cycles_sum.saturating_sub(last.write_first_cycles_sum);
            samples.push((dc as f64 / dp as f64, dp));
            last = r;
        }
        if r.pages_written == n || host.vm(id)?.state() != VmState::Running || Instant::now() > deadline {
            break;
        }
    }
    Ok((last, samples))
}
