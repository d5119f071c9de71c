//! The workload guest's report page, translated into the API's [`WorkloadReport`].

use api::types::{WorkloadPhase, WorkloadReport};
use vm_memory::{Bytes, GuestAddress};

use vmm::vm::{BootSource, Vm};
use vmm::workload::abi::{self, WorkloadConfig};
use vmm::workload::layout::WorkloadLayout;

/// The progress of `vm`'s workload guest (`None` for other guests).
pub fn workload_report(vm: &Vm) -> Option<WorkloadReport> {
    if !matches!(vm.spec().boot, BootSource::Workload(_)) {
        return None;
    }
    let r = vm.workload_report().unwrap_or_default();
    // The TSC frequency densevm gave the guest, from vCPU 0's config page.
    let tsc_khz = vm
        .ram()
        .memory()
        .read_obj::<WorkloadConfig>(GuestAddress(WorkloadLayout::config_gpa(0)))
        .map(|c| c.tsc_khz)
        .unwrap_or(0);
    Some(translate(&r, tsc_khz))
}

/// Translates a summed guest report; `tsc_khz` converts its cycle counts to ms.
pub fn translate(r: &abi::WorkloadReport, tsc_khz: u64) -> WorkloadReport {
    let started = r.magic == abi::REPORT_MAGIC;
    let phase = if r.mismatches > 0 {
        WorkloadPhase::Failed
    } else if !started {
        WorkloadPhase::Starting
    } else {
        match r.state {
            abi::STATE_FILLING => WorkloadPhase::Filling,
            abi::STATE_RUNNING => WorkloadPhase::Writing,
            abi::STATE_DONE => WorkloadPhase::Done,
            _ => WorkloadPhase::Starting,
        }
    };
    let ms = |cycles: u64| if tsc_khz == 0 { 0.0 } else { cycles as f64 / tsc_khz as f64 };
    WorkloadReport {
        phase,
        data_pages: r.npages,
        pages_filled: r.pages_filled,
        pages_written: r.pages_written,
        pages_verified: r.pages_verified,
        full_verifies: r.full_verifies,
        mismatches: r.mismatches,
        first_mismatch: r.first_mismatch.checked_sub(1),
        fill_ms: (r.fill_cycles > 0 && tsc_khz > 0).then(|| ms(r.fill_cycles)),
        elapsed_ms: if started { ms(r.now_tsc.saturating_sub(r.start_tsc)) } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_times() {
        let mut r = abi::WorkloadReport { npages: 10, ..Default::default() };
        assert_eq!(translate(&r, 1000).phase, WorkloadPhase::Starting);
        r.magic = abi::REPORT_MAGIC;
        r.state = abi::STATE_FILLING;
        assert_eq!(translate(&r, 1000).phase, WorkloadPhase::Filling);
        r.state = abi::STATE_RUNNING;
        r.fill_cycles = 5_000;
        r.start_tsc = 1_000;
        r.now_tsc = 21_000;
        r.pages_written = 7;
        let t = translate(&r, 1000);
        assert_eq!(t.phase, WorkloadPhase::Writing);
        assert_eq!((t.fill_ms, t.elapsed_ms, t.pages_written, t.data_pages), (Some(5.0), 20.0, 7, 10));
        assert_eq!(t.first_mismatch, None);
        r.state = abi::STATE_DONE;
        assert_eq!(translate(&r, 1000).phase, WorkloadPhase::Done);
        r.mismatches = 1;
        r.first_mismatch = 4;
        let t = translate(&r, 0);
        assert_eq!((t.phase, t.first_mismatch, t.fill_ms), (WorkloadPhase::Failed, Some(3), None));
    }
}
