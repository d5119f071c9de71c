//! One memory policy of `densevm bench merge`: the same N workload microVMs
//! (clones of one image, idle after their fill), merged by densevm, by the
//! kernel's KSM or not at all, measured from the moment merging starts.

use std::time::{Duration, Instant};

use memory::Tunables;
use vmm::workload::scenario::Scenario;

use super::measure::{ksm_merging_pages, present_and_frames, task_cpu_s};
use crate::bench::ksm::KsmControl;
use crate::commands::CommandError;
use vmm::guest_ram::RamPolicy;
use vmm::host::Host;
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec, VmState};

/// The merge domain of the densevm policies (all VMs of a run share it).
const DOMAIN: &str = "bench-merge";
/// Seed of the clone image every VM holds.
const SHARED_SEED: u64 = 0x5eed_c10e;
/// Interval between samples of the merge counters.
const SAMPLE: Duration = Duration::from_millis(5);

/// Who merges.
#[derive(Clone, Copy, Debug)]
pub enum Merging {
    /// densevm's merger with these tunables, on managed RAM.
    Densevm(Tunables),
    /// The kernel's KSM on private anonymous RAM (`MADV_MERGEABLE`) at this rate.
    Ksm {
        /// `/sys/kernel/mm/ksm/pages_to_scan`.
        pages_to_scan: u32,
        /// `/sys/kernel/mm/ksm/sleep_millisecs`.
        sleep_ms: u64,
    },
    /// Nobody (managed RAM, merging off).
    Off,
}

/// A policy to measure.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Short name (JSON key).
    pub name: &'static str,
    /// What it is, for people.
    pub what: &'static str,
    /// Who merges.
    pub merging: Merging,
}

/// Sizes and durations of a run.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Number of VMs.
    pub vms: u32,
    /// MiB each guest fills.
    pub fill_mib: u32,
    /// Share of each guest's pages that is the common image.
    pub shared_fraction: f64,
    /// pages_sharing that counts as converged (the clone image merged).
    pub target: u64,
    /// After reaching `target`, pages_sharing must not change for this long.
    pub settle: Duration,
    /// Window of the steady-state CPU measurement.
    pub steady: Duration,
    /// Longest wait for convergence.
    pub timeout: Duration,
}

/// The result of one policy.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PolicyResult {
    /// Short name.
    pub name: &'static str,
    /// Description.
    pub what: &'static str,
    /// `managed` or `anonymous`.
    pub ram: &'static str,
    /// pages_sharing reached the target within the timeout.
    pub converged: bool,
    /// Seconds from the start of merging until pages_sharing reached the target.
    pub converge_s: Option<f64>,
    /// Seconds from the start of merging until pages_sharing last changed.
    pub settle_s: Option<f64>,
    /// pages_sharing after the steady window.
    pub pages_sharing: u64,
    /// pages_shared after the steady window.
    pub pages_shared: u64,
    /// Full scans until convergence.
    pub full_scans_to_converge: u64,
    /// CPU seconds of the merging thread until convergence.
    pub cpu_s_to_converge: Option<f64>,
    /// CPU seconds of the merging thread per second of the steady window (idle guests).
    pub steady_cpu_per_s: Option<f64>,
    /// densevm only: the same with the merger's back-off forbidden.
    pub steady_cpu_per_s_without_backoff: Option<f64>,
    /// Host memory behind guest RAM when merging started.
    pub host_bytes_before: u64,
    /// Host memory behind guest RAM after the steady window.
    pub host_bytes: u64,
    /// Anonymous RAM: present pages of the guest ranges, in bytes (a KSM page
    /// counts once per guest page mapping it).
    pub present_bytes: Option<u64>,
    /// Anonymous RAM: /proc/self/ksm_merging_pages at the end.
    pub ksm_merging_pages: Option<u64>,
    /// Full scans between convergence and the steady window.
    pub full_scans_before_steady: u64,
    /// Seconds from the start of merging to the start of the steady window (two
    /// full scans after the count settled; for densevm also its idle mode).
    pub steady_after_s: Option<f64>,
    /// Every guest completed a full verify pass after convergence.
    pub verified_after_merge: bool,
    /// Pages the guests verified in total.
    pub pages_verified: u64,
    /// Pages that did not verify (reports plus mismatch doorbells): must be 0.
    pub mismatches: u64,
    /// Guest progress while merging: pages the guests verified per second from
    /// the start of merging until convergence (all VMs together).
    pub guest_verify_rate_merging: Option<f64>,
    /// The same over the steady window with merging done (the guests' idle pace).
    pub guest_verify_rate_idle: Option<f64>,
    /// densevm: merge chunks that held the guests' vCPUs until convergence.
    pub vcpu_holds: Option<u64>,
    /// densevm: seconds the vCPUs were held until convergence.
    pub vcpu_hold_s: Option<f64>,
    /// densevm: holds whose vCPUs did not leave guest mode in time.
    pub vcpu_hold_timeouts: Option<u64>,
}

/// Merge counters of whoever merges.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    shared: u64,
    sharing: u64,
    scans: u64,
}

fn rt(e: impl std::fmt::Display) -> CommandError {
    CommandError::Runtime(e.to_string())
}

fn spec(id: String, index: u32, p: &Params, merging: Merging) -> VmSpec {
    let scenario = Scenario {
        fill_mib: p.fill_mib,
        zero_fraction: 0.0,
        shared_fraction: p.shared_fraction,
        shared_seed: SHARED_SEED,
        seed: Some(1000 + u64::from(index)),
        write_fraction: 0.0,
        writes_per_s: 0,
        duration_s: 0,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    };
    let ram = match merging {
        Merging::Ksm { .. } => RamPolicy::Anonymous { mergeable: true },
        _ => RamPolicy::Managed,
    };
    VmSpec {
        id,
        vcpus: 1,
        mem_mib: vmm::workload::mem_mib(p.fill_mib),
        boot: BootSource::Workload(scenario),
        serial: SerialOut::None,
        ram,
        pause_after_fill: false,
        merge: MergeSpec { enabled: matches!(merging, Merging::Densevm(_)), domain: Some(DOMAIN.into()) },
        balloon: None,
    }
}

/// The scenario's clone image, for the expected merge count.
pub fn scenario_of(p: &Params) -> Scenario {
    match spec(String::new(), 0, p, Merging::Off).boot {
        BootSource::Workload(s) => s,
        BootSource::Linux(_) => Scenario::default(),
    }
}

/// Runs `policy` on fresh VMs (removed afterwards, also on failure).
pub fn run(
    host: &mut Host,
    policy: &Policy,
    p: &Params,
    ksm: Option<&mut KsmControl>,
    interrupted: &dyn Fn() -> bool,
) -> Result<PolicyResult, CommandError> {
    let ids: Vec<String> = (0..p.vms).map(|i| format!("merge-{}-{i}", policy.name)).collect();
    let mut res = Ok(PolicyResult::default());
    host.declare_domain(DOMAIN, vmm::domains::DomainPolicy::default())?;
    for (i, id) in ids.iter().enumerate() {
        if let Err(e) = host.create_vm(spec(id.clone(), i as u32, p, policy.merging)) {
            res = Err(e.into());
            break;
        }
    }
    if res.is_ok() {
        res = measure(host, policy, p, &ids, ksm, interrupted);
    }
    for id in &ids {
        let _ = host.remove_vm(id, None);
    }
    if matches!(policy.merging, Merging::Densevm(_)) {
        host.memory().merger().set_run(false);
    }
    res
}

/// Processes every VM's events; fails if one stopped.
pub(crate) fn tend(host: &mut Host, ids: &[String]) -> Result<(), CommandError> {
    for id in ids {
        let vm = host.vm_mut(id)?;
        vm.handle_events();
        if matches!(vm.state(), VmState::Exited | VmState::Stopped) {
            return Err(rt(format!("{id} stopped: {}", vm.timeline().exit_reason.clone().unwrap_or_default())));
        }
    }
    Ok(())
}

/// Sleeps `d` while tending the VMs.
pub(crate) fn idle_for(
    host: &mut Host,
    ids: &[String],
    d: Duration,
    interrupted: &dyn Fn() -> bool,
) -> Result<(), CommandError> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return Err(rt("interrupted"));
        }
        tend(host, ids)?;
        std::thread::sleep(SAMPLE.min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// The workload report of every VM of `ids`.
pub(crate) fn reports(host: &Host, ids: &[String]) -> Result<Vec<vmm::workload::abi::WorkloadReport>, CommandError> {
    ids.iter().map(|id| host.vm(id)?.workload_report().ok_or_else(|| rt(format!("{id}: no workload report")))).collect()
}

fn measure(
    host: &mut Host,
    policy: &Policy,
    p: &Params,
    ids: &[String],
    mut ksm: Option<&mut KsmControl>,
    interrupted: &dyn Fn() -> bool,
) -> Result<PolicyResult, CommandError> {
    for id in ids {
        host.vm_mut(id)?.start().map_err(rt)?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ids.iter().all(|id| host.vm(id).is_ok_and(|v| v.timeline().fill_done_s.is_some())) {
        if Instant::now() > deadline {
            return Err(rt("the guests did not finish their fill within 120 s"));
        }
        idle_for(host, ids, SAMPLE, interrupted)?;
    }
    let ranges: Vec<(u64, u64)> =
        ids.iter().map(|id| host.vm(id).map(|v| (v.ram().host_addr(), v.ram().size()))).collect::<Result<_, _>>()?;
    let mut r = PolicyResult { name: policy.name, what: policy.what, ..PolicyResult::default() };
    let task = match policy.merging {
        Merging::Densevm(_) => Some(format!("/proc/self/task/{}", host.memory().merger().scanner_tid())),
        Merging::Ksm { .. } => super::measure::ksmd_pid().map(|pid| format!("/proc/{pid}")),
        Merging::Off => None,
    };
    let cpu = || task.as_deref().and_then(task_cpu_s);
    let ksm_base = match ksm.as_deref() {
        Some(k) => k.counters().map_err(rt)?,
        None => crate::bench::ksm::KsmCounters::default(),
    };
    let counts = |host: &Host, ksm: &Option<&mut KsmControl>| -> Result<Counts, CommandError> {
        Ok(match (policy.merging, ksm.as_deref()) {
            (Merging::Ksm { .. }, Some(k)) => {
                let c = k.counters().map_err(rt)?;
                Counts {
                    shared: c.pages_shared.saturating_sub(ksm_base.pages_shared),
                    sharing: c.pages_sharing.saturating_sub(ksm_base.pages_sharing),
                    scans: c.full_scans.saturating_sub(ksm_base.full_scans),
                }
            }
            (Merging::Ksm { .. }, None) => return Err(rt("the KSM policy needs KSM")),
            _ => {
                let s = host.memory().merger().stats();
                Counts { shared: s.pages_shared, sharing: s.pages_sharing, scans: s.full_scans }
            }
        })
    };
    r.ram = if matches!(policy.merging, Merging::Ksm { .. }) { "anonymous" } else { "managed" };
    let anon_bytes = |sharing: u64| -> Result<(u64, u64), CommandError> {
        let (present, frames) = present_and_frames(&ranges).map_err(rt)?;
        Ok((present * 4096, frames.unwrap_or_else(|| present.saturating_sub(sharing)) * 4096))
    };
    r.host_bytes_before = match policy.merging {
        Merging::Ksm { .. } => anon_bytes(0)?.1,
        _ => host.memory().stats().host_bytes,
    };

    // Start merging and wait until the clone image is merged and the count settles.
    let scans0 = counts(host, &ksm)?.scans;
    let cpu0 = cpu();
    let verified = |host: &Host| -> Result<u64, CommandError> {
        Ok(reports(host, ids)?.iter().map(|rep| rep.pages_verified).sum())
    };
    let verified0 = verified(host)?;
    let holds0 = host.memory().stats().counters;
    let t0 = Instant::now();
    match (policy.merging, ksm.as_deref_mut()) {
        (Merging::Densevm(t), _) => host.memory().merger().set_tunables(t).map_err(rt)?,
        (Merging::Ksm { pages_to_scan, sleep_ms }, Some(k)) => {
            k.set("pages_to_scan", &pages_to_scan.to_string()).map_err(rt)?;
            k.set("sleep_millisecs", &sleep_ms.to_string()).map_err(rt)?;
            k.set("run", "1").map_err(rt)?;
        }
        _ => {}
    }
    if !matches!(policy.merging, Merging::Off) {
        let mut last = counts(host, &ksm)?.sharing;
        let mut last_change = t0;
        loop {
            idle_for(host, ids, SAMPLE, interrupted)?;
            let c = counts(host, &ksm)?;
            let now = Instant::now();
            if c.sharing != last {
                (last, last_change) = (c.sharing, now);
            }
            if r.converge_s.is_none() && c.sharing >= p.target {
                r.converge_s = Some((now - t0).as_secs_f64());
                r.cpu_s_to_converge = cpu().zip(cpu0).map(|(b, a)| b - a);
                r.full_scans_to_converge = c.scans - scans0;
                let done = verified(host)?.saturating_sub(verified0) as f64;
                r.guest_verify_rate_merging = Some(done / (now - t0).as_secs_f64().max(1e-9));
                if matches!(policy.merging, Merging::Densevm(_)) {
                    let c1 = host.memory().stats().counters;
                    r.vcpu_holds = Some(c1.vcpu_holds - holds0.vcpu_holds);
                    r.vcpu_hold_s = Some((c1.vcpu_hold_us - holds0.vcpu_hold_us) as f64 / 1e6);
                    r.vcpu_hold_timeouts = Some(c1.vcpu_hold_timeouts - holds0.vcpu_hold_timeouts);
                }
            }
            if r.converge_s.is_some() && now - last_change >= p.settle || now - t0 >= p.timeout {
                break;
            }
        }
        r.converged = r.converge_s.is_some();
        r.settle_s = Some((last_change - t0).as_secs_f64());
    }
    let verifies: Vec<u64> = reports(host, ids)?.iter().map(|rep| rep.full_verifies).collect();
    // Steady state begins after two more full scans (densevm: a quiet scan and an
    // idle poll, or scans; KSM: scans), at most `timeout` later.
    if !matches!(policy.merging, Merging::Off) {
        let (base, t) = (counts(host, &ksm)?.scans, Instant::now());
        while counts(host, &ksm)?.scans < base + 2 && t.elapsed() < p.timeout {
            idle_for(host, ids, Duration::from_millis(20), interrupted)?;
        }
        r.full_scans_before_steady = counts(host, &ksm)?.scans - base;
        if matches!(policy.merging, Merging::Densevm(_)) {
            // densevm's steady state is its idle mode (dirty-log polling), entered
            // after a quiet full scan; KSM has none and rescans forever.
            while !host.memory().merger().stats().idle && t.elapsed() < p.timeout {
                idle_for(host, ids, Duration::from_millis(20), interrupted)?;
            }
        }
        r.steady_after_s = Some(t0.elapsed().as_secs_f64());
    }

    // Steady state with idle guests.
    let steady = |host: &mut Host| -> Result<Option<f64>, CommandError> {
        let (a, t) = (cpu(), Instant::now());
        idle_for(host, ids, p.steady, interrupted)?;
        Ok(cpu().zip(a).map(|(b, a)| (b - a) / t.elapsed().as_secs_f64()))
    };
    let (v, t) = (verified(host)?, Instant::now());
    r.steady_cpu_per_s = steady(host)?;
    r.guest_verify_rate_idle = Some(verified(host)?.saturating_sub(v) as f64 / t.elapsed().as_secs_f64());
    let c = counts(host, &ksm)?;
    (r.pages_shared, r.pages_sharing) = (c.shared, c.sharing);
    match policy.merging {
        Merging::Ksm { .. } => {
            let (present, frames) = anon_bytes(c.sharing)?;
            (r.present_bytes, r.host_bytes) = (Some(present), frames);
            r.ksm_merging_pages = ksm_merging_pages();
        }
        _ => r.host_bytes = host.memory().stats().host_bytes,
    }
    if matches!(policy.merging, Merging::Densevm(_)) {
        host.memory().merger().set_backoff(false);
        let without = steady(host);
        host.memory().merger().set_backoff(true);
        r.steady_cpu_per_s_without_backoff = without?;
    }

    // Every guest verifies all its pages once more after merging.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now: Vec<u64> = reports(host, ids)?.iter().map(|rep| rep.full_verifies).collect();
        if now.iter().zip(&verifies).all(|(n, v)| n > v) {
            r.verified_after_merge = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        idle_for(host, ids, Duration::from_millis(20), interrupted)?;
    }
    if let (Merging::Ksm { .. }, Some(k)) = (policy.merging, ksm) {
        k.set("run", "0").map_err(rt)?;
    }
    for (id, rep) in ids.iter().zip(reports(host, ids)?) {
        r.mismatches += rep.mismatches + host.vm(id)?.timeline().mismatch_events;
        r.pages_verified += rep.pages_verified;
    }
    Ok(r)
}
