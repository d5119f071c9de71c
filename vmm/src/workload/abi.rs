//! The workload guest's ABI, mirrored from `resources/workload/abi.h`: the config
//! page densevm writes for each vCPU, the report page the guest writes back, and the
//! doorbell commands.

use vm_memory::ByteValued;

/// Magic of a config page ("DVMCFG0").
pub const CONFIG_MAGIC: u64 = 0x0044_564d_4346_4730;
/// Magic of a report page ("DVMRPT0").
pub const REPORT_MAGIC: u64 = 0x0044_564d_5250_5430;

/// Doorbell: sleep for the argument in microseconds (an idle wait).
pub const DB_SLEEP_US: u8 = 1;
/// Doorbell: fill and first full verify finished.
pub const DB_FILL_DONE: u8 = 2;
/// Doorbell: the write loop is over and the final verify is done; the guest stops.
pub const DB_DONE: u8 = 3;
/// Doorbell: the argument is a page whose content did not verify.
pub const DB_MISMATCH: u8 = 4;
/// Doorbell: the report page was updated.
pub const DB_PROGRESS: u8 = 5;
/// Doorbell: the argument is the guest address of a NUL-terminated console line.
pub const DB_PUTS: u8 = 6;
/// Longest console line the VMM reads.
pub const MAX_LINE: usize = 128;

/// Report state: booting.
pub const STATE_BOOT: u64 = 0;
/// Report state: filling the data pages.
pub const STATE_FILLING: u64 = 1;
/// Report state: in the write loop.
pub const STATE_RUNNING: u64 = 2;
/// Report state: finished.
pub const STATE_DONE: u64 = 3;

/// Per-vCPU configuration page (`struct workload_config`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: u64,
    /// Guest-physical address of the MMIO doorbell.
    pub doorbell_gpa: u64,
    /// Guest-physical address of this vCPU's first data page.
    pub data_gpa: u64,
    /// Number of data pages this vCPU fills.
    pub npages: u64,
    /// Global index of this vCPU's first data page.
    pub page_base: u64,
    /// Guest-physical address of this vCPU's version table (u32 per page).
    pub versions_gpa: u64,
    /// TSC frequency in kHz.
    pub tsc_khz: u64,
    /// Zero-page fraction as a threshold over 2^32.
    pub zero_thr: u64,
    /// Shared-page fraction as a threshold over 2^32.
    pub shared_thr: u64,
    /// Write fraction as a threshold over 2^32.
    pub write_thr: u64,
    /// Seed of shared pages.
    pub shared_seed: u64,
    /// Seed of unique pages.
    pub seed: u64,
    /// Page rewrites per second (for this vCPU).
    pub writes_per_s: u64,
    /// Seconds of write loop; 0 = until stopped.
    pub duration_s: u64,
    /// Idle sleep granularity in microseconds.
    pub quantum_us: u64,
    /// Pages verified per wake-up in the loop.
    pub verify_chunk: u64,
    /// 1: print progress on the serial port.
    pub serial: u64,
    /// Guest-physical base of the virtio-balloon's registers, or 0: no balloon step.
    pub balloon_gpa: u64,
    /// Guest-physical address of the balloon driver's rings and buffers
    /// ([`crate::workload::layout::BALLOON_SCRATCH`] bytes).
    pub balloon_scratch_gpa: u64,
    /// Milliseconds to hold the balloon inflated.
    pub balloon_hold_ms: u64,
    /// Pages the balloon driver deflates below the target on its own after its
    /// first inflation (deflate on OOM), or 0.
    pub balloon_oom_pages: u64,
}

// SAFETY: WorkloadConfig is a repr(C) struct of u64 fields only: no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for WorkloadConfig {}

/// Per-vCPU report page (`struct workload_report`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadReport {
    /// [`REPORT_MAGIC`] once the guest started.
    pub magic: u64,
    /// One of the `STATE_*` values.
    pub state: u64,
    /// Data pages of this vCPU.
    pub npages: u64,
    /// Pages filled so far.
    pub pages_filled: u64,
    /// Page rewrites in the write loop.
    pub pages_written: u64,
    /// Page verifications done.
    pub pages_verified: u64,
    /// Pages that did not verify.
    pub mismatches: u64,
    /// First mismatching page index + 1, or 0.
    pub first_mismatch: u64,
    /// Complete verify passes.
    pub full_verifies: u64,
    /// TSC cycles of the fill.
    pub fill_cycles: u64,
    /// TSC at guest start.
    pub start_tsc: u64,
    /// TSC at the last report update.
    pub now_tsc: u64,
    /// TSC cycles spent in rewrites.
    pub write_cycles_sum: u64,
    /// Slowest rewrite in cycles.
    pub write_cycles_max: u64,
    /// Slowest first store into a page, in cycles.
    pub write_first_cycles_max: u64,
    /// Sum of first-store cycles.
    pub write_first_cycles_sum: u64,
    /// Idle wake-ups.
    pub wakeups: u64,
}

// SAFETY: WorkloadReport is a repr(C) struct of u64 fields only: no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for WorkloadReport {}

impl WorkloadReport {
    /// Adds another vCPU's report into this one (counts add, maxima combine).
    pub fn accumulate(&mut self, o: &WorkloadReport) {
        self.state = if self.npages == 0 { o.state } else { self.state.min(o.state) };
        self.npages += o.npages;
        self.pages_filled += o.pages_filled;
        self.pages_written += o.pages_written;
        self.pages_verified += o.pages_verified;
        self.mismatches += o.mismatches;
        if self.first_mismatch == 0 {
            self.first_mismatch = o.first_mismatch;
        }
        self.full_verifies = if self.magic == 0 { o.full_verifies } else { self.full_verifies.min(o.full_verifies) };
        self.magic = o.magic;
        self.fill_cycles = self.fill_cycles.max(o.fill_cycles);
        self.start_tsc = if self.start_tsc == 0 { o.start_tsc } else { self.start_tsc.min(o.start_tsc) };
        self.now_tsc = self.now_tsc.max(o.now_tsc);
        self.write_cycles_sum += o.write_cycles_sum;
        self.write_cycles_max = self.write_cycles_max.max(o.write_cycles_max);
        self.write_first_cycles_sum += o.write_first_cycles_sum;
        self.write_first_cycles_max = self.write_first_cycles_max.max(o.write_first_cycles_max);
        self.wakeups += o.wakeups;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_header() {
        // The C header has 21 u64 fields in the config (17 + the balloon step's
        // 4) and 17 in the report, in this order.
        assert_eq!(std::mem::size_of::<WorkloadConfig>(), 21 * 8);
        assert_eq!(std::mem::size_of::<WorkloadReport>(), 17 * 8);
        let header = include_str!("../../../resources/workload/abi.h");
        let fields = |name: &str| {
            let start = header.find(&format!("struct {name} {{")).unwrap();
            let body = &header[start..start + header[start..].find("};").unwrap()];
            body.matches("uint64_t ").count()
        };
        assert_eq!(fields("workload_config"), 21);
        assert_eq!(fields("workload_report"), 17);
        assert!(header.contains(&format!("CONFIG_MAGIC {CONFIG_MAGIC:#x}ULL")));
        assert!(header.contains(&format!("REPORT_MAGIC {REPORT_MAGIC:#x}ULL")));
    }
}
