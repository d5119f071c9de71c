//! The fragmented pool of `densevm bench compact`: N workload microVMs fill
//! their memory, then a random 60% of their data frames are freed so that the
//! live frames scatter over many 2 MiB frames.
//!
//! How the frames are freed: the VMs are clones (one merge domain, the same
//! `shared_seed`) whose `shared_fraction` is chosen so that merging the clone
//! image frees 60% of all data frames: every shared page keeps one frame, the
//! other VMs' copies are freed. Which pages are shared is a hash of the page
//! index (resources/workload/guest.c `page_kind`), so the freed frames are a
//! random subset. densevm's merger frees them at full speed and is stopped
//! before anything is measured. The guests keep their content, so their
//! verification stays meaningful: every page still holds exactly what the
//! guest wrote, through compaction.
//!
//! Why not the two other frees: `MemoryManager::discard` drops a page's host
//! memory but keeps its frame (a punched hole that reads zero), so it frees no
//! frame for compaction to gather; deleting every other VM frees whole 2 MiB
//! frames, because a VM's RAM is allocated up front in the largest blocks
//! available (2 MiB frames), so it scatters nothing.

use std::time::{Duration, Instant};

use memory::Tunables;
use serde::Serialize;
use vmm::guest_ram::RamPolicy;
use vmm::host::Host;
use vmm::vm::{BootSource, MergeSpec, SerialOut, VmSpec};
use vmm::workload::scenario::Scenario;

use super::{rt, Params};
use crate::bench::merge::measure::shared_data_pages;
use crate::bench::merge::policy::{idle_for, reports, tend};
use crate::commands::CommandError;

/// Share of the VMs' data frames the scatter frees.
pub const FREED_FRACTION: f64 = 0.6;
/// Merge domain of the benchmark's VMs.
const DOMAIN: &str = "bench-compact";
/// Seed of the clone image.
const SHARED_SEED: u64 = 0x5eed_c0de;
/// Longest wait for the fill and for merging.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the guests' full verify pass after a measurement.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the scatter is made, for the output.
pub const METHOD: &str = "N clone workload VMs (one merge domain) fill their memory; densevm's merger (full speed, \
                          then stopped) frees the duplicate frames of the clone image, shared_fraction chosen so \
                          that 60% of all data frames are freed at hash-random pages; the guests keep running and \
                          verifying every page (merged pages hold the same content). Not discard: a discarded page \
                          keeps its frame (punched, reads zero), so it frees no frame; not deleting every other VM: \
                          VM RAM is allocated in whole 2 MiB frames, so that scatters nothing.";

/// The clone image's share of each guest's pages that frees [`FREED_FRACTION`]
/// of all data frames when `vms` clones merge (`s * (vms - 1) / vms`).
pub fn shared_fraction(vms: u32) -> f64 {
    let n = f64::from(vms.max(2));
    (FREED_FRACTION * n / (n - 1.0)).min(0.95)
}

/// What one scatter did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScatterInfo {
    /// Seconds from start until every guest had filled its memory.
    pub fill_s: f64,
    /// Seconds densevm's merger took to free the duplicates.
    pub merge_s: f64,
    /// Frames in use before merging.
    pub frames_used_before: u64,
    /// Frames in use after merging.
    pub frames_used_after: u64,
    /// Data frames the merge freed as a share of all data frames.
    pub freed_fraction_of_data: f64,
    /// 2 MiB frames holding live frames after the scatter.
    pub frames_2m_in_use: u64,
    /// Fewest 2 MiB frames the live frames fit in.
    pub ideal_frames_2m: u64,
    /// The compactor's fragmentation after the scatter.
    pub fragmentation: f64,
}

fn scenario(p: &Params, index: u32) -> Scenario {
    Scenario {
        fill_mib: p.fill_mib,
        zero_fraction: 0.0,
        shared_fraction: shared_fraction(p.vms),
        shared_seed: SHARED_SEED,
        seed: Some(3000 + u64::from(index)),
        write_fraction: 0.0,
        writes_per_s: 0,
        duration_s: 0,
        balloon_hold_ms: None,
        balloon_oom_deflate_mib: None,
    }
}

fn spec(id: String, index: u32, p: &Params) -> VmSpec {
    VmSpec {
        id,
        vcpus: 1,
        mem_mib: vmm::workload::mem_mib(p.fill_mib),
        boot: BootSource::Workload(scenario(p, index)),
        serial: SerialOut::None,
        ram: RamPolicy::Managed,
        pause_after_fill: false,
        merge: MergeSpec { enabled: true, domain: Some(DOMAIN.into()) },
        balloon: None,
    }
}

/// Pages the guests of `ids` verified so far, together.
pub fn verified(host: &Host, ids: &[String]) -> Result<u64, CommandError> {
    Ok(reports(host, ids)?.iter().map(|r| r.pages_verified).sum())
}

/// Creates `p.vms` VMs named `<tag>-<i>`, lets them fill their memory and frees
/// 60% of their data frames (see the module doc). The merger is stopped when
/// this returns, and every guest verified all its pages once since merging; the
/// VMs run (idle, verifying). On failure the VMs created so
/// far are in `ids` for the caller to remove.
pub fn create(
    host: &mut Host,
    p: &Params,
    tag: &str,
    ids: &mut Vec<String>,
    interrupted: &dyn Fn() -> bool,
) -> Result<ScatterInfo, CommandError> {
    host.declare_domain(DOMAIN, vmm::domains::DomainPolicy::default())?;
    for i in 0..p.vms {
        let id = format!("{tag}-{i}");
        host.create_vm(spec(id.clone(), i, p))?;
        ids.push(id);
    }
    let t0 = Instant::now();
    for id in ids.iter() {
        host.vm_mut(id)?.start().map_err(rt)?;
    }
    while !ids.iter().all(|id| host.vm(id).is_ok_and(|v| v.timeline().fill_done_s.is_some())) {
        if t0.elapsed() > PREPARE_TIMEOUT {
            return Err(rt(format!("the guests did not fill their memory within {PREPARE_TIMEOUT:?}")));
        }
        idle_for(host, ids, Duration::from_millis(5), interrupted)?;
    }
    let mut info = ScatterInfo { fill_s: t0.elapsed().as_secs_f64(), ..ScatterInfo::default() };
    let target = shared_data_pages(&scenario(p, 0)) * u64::from(p.vms - 1);
    info.frames_used_before = host.memory().stats().frames_used;
    let merger = host.memory().merger();
    let t1 = Instant::now();
    merger.set_tunables(Tunables { merge_zero_pages: false, ..Tunables::full_speed() }).map_err(rt)?;
    let merged = loop {
        if host.memory().stats().pages_sharing >= target {
            break Ok(());
        }
        if t1.elapsed() > PREPARE_TIMEOUT {
            break Err(rt(format!("merging the clone image ({target} pages) took longer than {PREPARE_TIMEOUT:?}")));
        }
        if let Err(e) = idle_for(host, ids, Duration::from_millis(5), interrupted) {
            break Err(e);
        }
    };
    host.memory().merger().set_run(false);
    merged?;
    info.merge_s = t1.elapsed().as_secs_f64();
    // Steady state before anything is measured: merging remapped most pages, so
    // the guests' first reads of them fault them back into the guest's page
    // tables (slow under nested KVM); one full verify pass takes them all.
    if !full_verify_pass(host, ids, interrupted)? {
        return Err(rt(format!("the guests did not complete a verify pass within {VERIFY_TIMEOUT:?} after merging")));
    }
    let stats = host.memory().stats();
    info.frames_used_after = stats.frames_used;
    let data_frames = u64::from(p.vms) * u64::from(p.fill_mib) * 256;
    info.freed_fraction_of_data =
        info.frames_used_before.saturating_sub(info.frames_used_after) as f64 / data_frames.max(1) as f64;
    info.frames_2m_in_use = stats.huge_frames_in_use;
    info.ideal_frames_2m = stats.compaction.ideal_frames_2m;
    info.fragmentation = stats.compaction.fragmentation;
    Ok(info)
}

/// Waits until every guest completed a full verify pass after this call began
/// (at most [`VERIFY_TIMEOUT`]); returns whether they all did.
fn full_verify_pass(host: &mut Host, ids: &[String], interrupted: &dyn Fn() -> bool) -> Result<bool, CommandError> {
    let before: Vec<u64> = reports(host, ids)?.iter().map(|r| r.full_verifies).collect();
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    while Instant::now() < deadline {
        let now: Vec<u64> = reports(host, ids)?.iter().map(|r| r.full_verifies).collect();
        if now.iter().zip(&before).all(|(n, b)| n > b) {
            return Ok(true);
        }
        idle_for(host, ids, Duration::from_millis(20), interrupted)?;
    }
    Ok(false)
}

/// Waits until every guest completed a full verify pass after this call began,
/// then returns (the guests' mismatches, whether every guest verified again).
pub fn finish(host: &mut Host, ids: &[String], interrupted: &dyn Fn() -> bool) -> Result<(u64, bool), CommandError> {
    let verified_again = full_verify_pass(host, ids, interrupted)?;
    tend(host, ids)?;
    let mut mismatches = 0;
    for (id, rep) in ids.iter().zip(reports(host, ids)?) {
        mismatches += rep.mismatches + host.vm(id)?.timeline().mismatch_events;
    }
    Ok((mismatches, verified_again))
}

/// Removes the VMs of `ids` (errors are ignored: they are gone either way).
pub fn remove(host: &mut Host, ids: &[String]) {
    for id in ids {
        let _ = host.remove_vm(id, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_the_clones_frees_the_chosen_share() {
        for vms in [4, 8, 16] {
            let s = shared_fraction(vms);
            let freed = s * f64::from(vms - 1) / f64::from(vms);
            assert!((freed - FREED_FRACTION).abs() < 1e-9, "{vms}: {s}");
        }
        // Too few clones to free 60%: capped, never above a valid fraction.
        assert!(shared_fraction(2) <= 0.95 && shared_fraction(0) <= 0.95);
    }
}
