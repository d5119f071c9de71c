//! The I/O router the vCPU threads share: every port-I/O and MMIO exit goes through
//! it to the device that claims it, and unclaimed accesses are counted and logged.

use devices::{MmioBus, PioBus};

use super::doorbell::{ExitAction, WorkloadDoorbell};
use super::unclaimed::{Access, UnclaimedCounter, UnclaimedIo};

/// The buses and the doorbell of one VM, as the vCPU exit loop sees them.
pub struct IoRouter {
    pub(crate) pio: PioBus,
    pub(crate) mmio: MmioBus,
    pub(crate) doorbell: Option<WorkloadDoorbell>,
    unclaimed: UnclaimedCounter,
}

impl std::fmt::Debug for IoRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoRouter")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("doorbell", &self.doorbell.as_ref().map(WorkloadDoorbell::gpa))
            .field("unclaimed", &self.unclaimed.snapshot())
            .finish()
    }
}

impl IoRouter {
    /// An empty router for the VM `vm_id` (the id labels its log lines).
    pub(crate) fn new(vm_id: &str) -> Self {
        IoRouter { pio: PioBus::new(), mmio: MmioBus::new(), doorbell: None, unclaimed: UnclaimedCounter::new(vm_id) }
    }

    /// Serves a port read (unclaimed: all-ones).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            self.unclaimed.record(Access::PioRead, u64::from(port), data.len());
        }
    }

    /// Serves a port write (unclaimed: dropped).
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            self.unclaimed.record(Access::PioWrite, u64::from(port), data.len());
        }
    }

    /// Serves an MMIO read (unclaimed: all-ones).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            self.unclaimed.record(Access::MmioRead, addr, data.len());
        }
    }

    /// True when `addr` is the workload doorbell's register.
    pub fn is_doorbell(&self, addr: u64) -> bool {
        self.doorbell.as_ref().is_some_and(|d| d.gpa() == addr)
    }

    /// Serves an MMIO write by vCPU `vcpu` (unclaimed: dropped); says whether the
    /// vCPU goes on running.
    pub fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction {
        if let Some(doorbell) = self.doorbell.as_ref().filter(|d| d.gpa() == addr) {
            return doorbell.ring(vcpu, data, &self.pio);
        }
        if !self.mmio.write(addr, data) {
            self.unclaimed.record(Access::MmioWrite, addr, data.len());
        }
        ExitAction::Resume
    }

    /// Unclaimed accesses so far.
    pub fn unclaimed(&self) -> UnclaimedIo {
        self.unclaimed.snapshot()
    }
}
