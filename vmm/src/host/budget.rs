//! The host memory budget (guest memory committed at creation) and the
//! per-daemon maxima of VMs and vCPUs.

use super::{Error, Host};
use crate::admission::Limits;
use crate::vm::VmSpec;

impl Host {
    /// Sets the host memory budget: VM creation is refused when the guest
    /// memory of every VM (whole sizes, committed at creation, until deleted)
    /// would exceed `bytes`. `None` (the default): no budget, only the memory
    /// manager's commitment limit.
    pub fn set_memory_budget(&mut self, bytes: Option<u64>) {
        self.budget_bytes = bytes;
    }

    /// The host memory budget in force.
    pub fn memory_budget(&self) -> Option<u64> {
        self.budget_bytes
    }

    /// Guest memory of every VM (created until deleted, counting those being
    /// built or torn down), in bytes.
    pub fn committed_guest_bytes(&self) -> u64 {
        self.vms.values().map(|e| e.vm.ram().size()).sum::<u64>() + self.admission.pending_bytes()
    }

    /// Sets the per-daemon maxima of VMs and vCPUs (default: none).
    pub fn set_limits(&mut self, limits: Limits) {
        self.admission.set_limits(limits);
    }

    /// The per-daemon maxima in force.
    pub fn limits(&self) -> Limits {
        self.admission.limits()
    }

    /// vCPUs of every VM (created until deleted).
    pub(super) fn vcpus_in_use(&self) -> u64 {
        self.vms.values().map(|e| u64::from(e.vm.spec().vcpus)).sum()
    }

    /// Refuses `spec` when its guest memory would take the committed total over the budget.
    pub(super) fn check_budget(&self, spec: &VmSpec) -> Result<(), Error> {
        let Some(budget) = self.budget_bytes else { return Ok(()) };
        let committed = self.committed_guest_bytes();
        let requested = spec.mem_mib.saturating_mul(1 << 20);
        if committed.saturating_add(requested) > budget {
            return Err(Error::OverBudget {
                committed_mib: committed >> 20,
                requested_mib: spec.mem_mib,
                budget_mib: budget >> 20,
            });
        }
        Ok(())
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (the default host memory budget).
pub fn mem_available_bytes() -> Result<u64, Error> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::Io(format!("/proc/meminfo: {e}")))?;
    parse_mem_available(&text).ok_or_else(|| Error::Io("/proc/meminfo has no MemAvailable line".into()))
}

pub(super) fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}
