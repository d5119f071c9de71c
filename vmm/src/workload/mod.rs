//! The workload guest: a small freestanding x86-64 program (resources/workload),
//! embedded in the binary, that densevm starts in 64-bit mode at CPL 3. It fills its
//! memory from a [`Scenario`], rewrites and verifies it, and reports through per-vCPU
//! report pages plus an MMIO doorbell.

pub mod abi;
pub mod layout;
pub mod scenario;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::cpl3::Cpl3Start;
use abi::{WorkloadConfig, WorkloadReport, CONFIG_MAGIC};
use layout::{
    WorkloadLayout, CODE_GPA, CODE_MAX, GDT_ENTRIES, GDT_GPA, PAGE_SIZE, PML4_GPA, TSS_GPA, TSS_SEL, USER_CS, USER_DS,
};
use scenario::Scenario;

/// The workload guest program, built from resources/workload by build.rs.
pub static WORKLOAD_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.bin"));

/// Idle sleep granularity of the guest's loop.
pub const QUANTUM_US: u64 = 5_000;
/// Pages the guest verifies per wake-up in its loop.
pub const VERIFY_CHUNK: u64 = 64;

/// Guest RAM in MiB a workload that fills `fill_mib` needs: the data plus the
/// layout's overhead (page tables, code, version table), rounded generously.
pub fn mem_mib(fill_mib: u32) -> u64 {
    u64::from(fill_mib) + 4 + u64::from(fill_mib).div_ceil(1024) * 2
}

/// Errors preparing a workload guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layout does not fit.
    #[error(transparent)]
    Layout(#[from] layout::Error),
    /// Writing guest memory failed.
    #[error("writing guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The program is larger than its slot.
    #[error("workload program of {0} bytes exceeds its slot")]
    ProgramTooLarge(usize),
}

/// A prepared workload guest: its layout and per-vCPU start states.
#[derive(Clone, Debug)]
pub struct WorkloadGuest {
    /// Memory layout.
    pub layout: WorkloadLayout,
    /// vCPU count.
    pub vcpus: u32,
}

fn threshold(fraction: f64) -> u64 {
    (fraction.clamp(0.0, 1.0) * 4_294_967_296.0) as u64
}

impl WorkloadGuest {
    /// Writes the program, GDT, TSS, page tables and config pages into `mem`.
    ///
    /// `seed` is the unique-page seed (the scenario's, or one derived from the VM id).
    pub fn prepare<M: GuestMemory>(
        mem: &M,
        ram_size: u64,
        scenario: &Scenario,
        seed: u64,
        vcpus: u32,
        tsc_khz: u64,
        serial: bool,
    ) -> Result<Self, Error> {
        let data_pages = u64::from(scenario.fill_mib) * (1 << 20) / PAGE_SIZE;
        let layout = WorkloadLayout::new(ram_size, data_pages, vcpus)?;
        if WORKLOAD_BIN.len() as u64 > CODE_MAX {
            return Err(Error::ProgramTooLarge(WORKLOAD_BIN.len()));
        }
        mem.write_slice(WORKLOAD_BIN, GuestAddress(CODE_GPA))?;
        layout.write_gdt_and_tss(mem)?;
        layout.write_page_tables(mem)?;
        for index in 0..vcpus {
            let (first, count) = layout.vcpu_slice(index, vcpus);
            let wps = scenario.writes_per_s / u64::from(vcpus)
                + u64::from(u64::from(index) < scenario.writes_per_s % u64::from(vcpus));
            let cfg = WorkloadConfig {
                magic: CONFIG_MAGIC,
                doorbell_gpa: layout.doorbell_gpa,
                data_gpa: layout.data_gpa + first * PAGE_SIZE,
                npages: count,
                page_base: first,
                versions_gpa: layout::VERSIONS_GPA + first * 4,
                tsc_khz,
                zero_thr: threshold(scenario.zero_fraction),
                shared_thr: threshold(scenario.shared_fraction),
                write_thr: threshold(scenario.write_fraction),
                shared_seed: scenario.shared_seed,
                seed,
                writes_per_s: wps,
                duration_s: scenario.duration_s,
                quantum_us: QUANTUM_US,
                verify_chunk: VERIFY_CHUNK.min(count.max(1)),
                serial: u64::from(serial && index == 0),
                // The balloon driver runs on vCPU 0 (see `enable_balloon`).
                balloon_oom_pages: match index {
                    0 => u64::from(scenario.balloon_oom_deflate_mib.unwrap_or(0)) * 256,
                    _ => 0,
                },
                ..WorkloadConfig::default()
            };
            mem.write_obj(cfg, GuestAddress(WorkloadLayout::config_gpa(index)))?;
            mem.write_obj(WorkloadReport::default(), GuestAddress(WorkloadLayout::report_gpa(index)))?;
        }
        Ok(WorkloadGuest { layout, vcpus })
    }

    /// Has vCPU 0 drive the virtio-balloon whose registers sit at `registers_gpa`
    /// after its fill (inflate to the device's target, hold `hold_ms`, deflate,
    /// check and refill): maps the low 4 GiB and gives the driver its scratch RAM.
    pub fn enable_balloon<M: GuestMemory>(&mut self, mem: &M, registers_gpa: u64, hold_ms: u64) -> Result<(), Error> {
        let scratch = self.layout.with_balloon()?;
        self.layout.write_page_tables(mem)?;
        let at = GuestAddress(WorkloadLayout::config_gpa(0));
        let mut cfg: WorkloadConfig = mem.read_obj(at)?;
        cfg.balloon_gpa = registers_gpa;
        cfg.balloon_scratch_gpa = scratch;
        cfg.balloon_hold_ms = hold_ms;
        mem.write_obj(cfg, at)?;
        Ok(())
    }

    /// The start state of vCPU `index`.
    pub fn start(&self, index: u32, io_privilege: bool) -> Cpl3Start {
        Cpl3Start {
            rip: CODE_GPA,
            rsp: WorkloadLayout::stack_top(index),
            rdi: WorkloadLayout::config_gpa(index),
            cr3: PML4_GPA,
            gdt: (GDT_GPA, GDT_ENTRIES),
            tss: (TSS_GPA, TSS_SEL),
            selectors: (USER_CS, USER_DS),
            io_privilege,
        }
    }

    /// Reads every vCPU's report page and sums them.
    pub fn read_report<M: GuestMemory>(&self, mem: &M) -> Result<WorkloadReport, Error> {
        let mut total = WorkloadReport::default();
        for index in 0..self.vcpus {
            let r: WorkloadReport = mem.read_obj(GuestAddress(WorkloadLayout::report_gpa(index)))?;
            total.accumulate(&r);
        }
        Ok(total)
    }
}

/// Derives a VM's unique-page seed from its id when the scenario gives none.
pub fn seed_for(vm_id: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    vm_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_cover_the_full_range() {
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(1.0), 1 << 32);
        assert_eq!(threshold(0.5), 1 << 31);
    }

    #[test]
    fn seeds_differ_per_vm() {
        assert_ne!(seed_for("vm0"), seed_for("vm1"));
        assert_eq!(seed_for("vm0"), seed_for("vm0"));
    }

    #[test]
    fn program_is_embedded() {
        assert!(WORKLOAD_BIN.len() > 256);
        assert!(WORKLOAD_BIN.len() as u64 <= CODE_MAX);
    }
}
