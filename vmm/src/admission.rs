//! Admission control of a host: the per-daemon maxima of VMs and vCPUs
//! (`serve --max-vms`, `--max-vcpus`), what each VM costs in file descriptors
//! and threads (so that the daemon can size `RLIMIT_NOFILE` at start), and the
//! VMs being built or torn down off the event loop, which count against the
//! maxima and the memory budget until they are done.

use std::collections::BTreeMap;

/// The most VMs one daemon can hold: the memory manager's write-retry table has
/// a slot per guest RAM range ([`memory::write_retry::RANGE_SLOTS`]).
pub const MAX_VMS: usize = memory::write_retry::RANGE_SLOTS;

/// File descriptors a VM holds besides its vCPUs': the KVM VM fd, its vCPU-event
/// eventfd, the serial console's and i8042's event fds, the workload doorbell or
/// a balloon's ioeventfds, irqfd and timerfd, and headroom. Measured: a workload
/// VM holds 5, a Linux VM with a balloon 9.
pub const FDS_PER_VM: u64 = 12;

/// File descriptors each vCPU holds (its KVM vCPU fd).
pub const FDS_PER_VCPU: u64 = 1;

/// Threads each vCPU runs (one; a VM has no thread of its own).
pub const THREADS_PER_VCPU: u64 = 1;

/// File descriptors the daemon needs besides its VMs and API connections:
/// /dev/kvm, the pool memfd, the event loop's epoll and eventfds, the memory
/// manager's threads' fds, logs, the API listeners, and headroom.
pub const FDS_BASE: u64 = 128;

/// Default vCPUs per host CPU.
pub const VCPUS_PER_HOST_CPU: u64 = 64;

/// Errors of admission.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon runs as many VMs as it may.
    #[error("too many VMs: {in_use} of at most {max} exist (serve --max-vms); delete one first")]
    TooManyVms {
        /// VMs existing or being built or torn down.
        in_use: usize,
        /// The maximum.
        max: usize,
    },
    /// The new VM's vCPUs would exceed the daemon's maximum.
    #[error(
        "too many vCPUs: {in_use} in use + {requested} requested > {max} allowed (serve --max-vcpus); \
         delete a VM first"
    )]
    TooManyVcpus {
        /// vCPUs of the VMs existing or being built or torn down.
        in_use: u64,
        /// The new VM's vCPUs.
        requested: u32,
        /// The maximum.
        max: u64,
    },
    /// One VM asks for more vCPUs than the whole daemon may run.
    #[error("vcpu_count {requested} exceeds the daemon's maximum of {max} vCPUs (serve --max-vcpus)")]
    VmOverVcpuLimit {
        /// The VM's vCPUs.
        requested: u32,
        /// The maximum.
        max: u64,
    },
    /// The VM is being built or torn down.
    #[error("VM {id} is being {what}; try again when that request is answered")]
    Busy {
        /// The VM.
        id: String,
        /// "created" or "deleted".
        what: &'static str,
    },
}

impl Error {
    /// True when the request can never succeed as it is (a 400 rather than a 409).
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::VmOverVcpuLimit { .. })
    }
}

/// Per-daemon maxima.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most VMs at once.
    pub max_vms: usize,
    /// Most vCPUs (of all VMs) at once.
    pub max_vcpus: u64,
}

impl Default for Limits {
    /// No limit (a library user's host; the daemon sets its own).
    fn default() -> Self {
        Limits { max_vms: usize::MAX, max_vcpus: u64::MAX }
    }
}

impl Limits {
    /// File descriptors these maxima need at most (without API connections).
    pub fn fds_needed(&self) -> u64 {
        let vms = u64::try_from(self.max_vms).unwrap_or(u64::MAX);
        FDS_BASE
            .saturating_add(vms.saturating_mul(FDS_PER_VM))
            .saturating_add(self.max_vcpus.saturating_mul(FDS_PER_VCPU))
    }

    /// Default maxima for a daemon with `fds` file descriptors left for VMs
    /// (after its base and API connections) on a host of `cpus` CPUs: 64 vCPUs
    /// per host CPU (microVMs are mostly idle; vCPU threads are overcommitted),
    /// and as many VMs as vCPUs, both cut down to what `fds` can hold, and the VMs
    /// to [`MAX_VMS`].
    pub fn defaults_for(fds: u64, cpus: u64) -> Limits {
        let max_vcpus = cpus.max(1).saturating_mul(VCPUS_PER_HOST_CPU);
        // Each VM has at least one vCPU: n VMs of one vCPU need n * (VM + vCPU) fds.
        let by_fds = fds / (FDS_PER_VM + FDS_PER_VCPU);
        let max_vms = max_vcpus.min(by_fds).min(MAX_VMS as u64).max(1);
        // The vCPUs of fewer, bigger VMs: whatever fds are left once the VMs' own are paid.
        let vcpus_by_fds = fds.saturating_sub(max_vms * FDS_PER_VM) / FDS_PER_VCPU;
        Limits {
            max_vms: usize::try_from(max_vms).unwrap_or(usize::MAX),
            max_vcpus: max_vcpus.min(vcpus_by_fds).max(max_vms),
        }
    }
}

/// A VM being built or torn down.
#[derive(Clone, Copy, Debug)]
struct Pending {
    vcpus: u32,
    mem_bytes: u64,
    deleting: bool,
}

/// The maxima in force and the VMs in flight.
#[derive(Debug, Default)]
pub struct Admission {
    limits: Limits,
    pending: BTreeMap<String, Pending>,
}

impl Admission {
    /// Sets the maxima (VMs already there stay).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The maxima in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Refuses `id` while it is in flight.
    pub fn check_idle(&self, id: &str) -> Result<(), Error> {
        match self.pending.get(id) {
            Some(p) => Err(Error::Busy { id: id.to_string(), what: if p.deleting { "deleted" } else { "created" } }),
            None => Ok(()),
        }
    }

    /// Checks that one more VM of `vcpus` fits beside `vms` existing VMs with
    /// `vcpus_in_use` vCPUs (the VMs in flight are added here).
    pub fn check(&self, vcpus: u32, vms: usize, vcpus_in_use: u64) -> Result<(), Error> {
        let max = self.limits.max_vcpus;
        if u64::from(vcpus) > max {
            return Err(Error::VmOverVcpuLimit { requested: vcpus, max });
        }
        let in_use = vms.saturating_add(self.pending.len());
        if in_use >= self.limits.max_vms {
            return Err(Error::TooManyVms { in_use, max: self.limits.max_vms });
        }
        let in_use = vcpus_in_use.saturating_add(self.pending_vcpus());
        if in_use.saturating_add(u64::from(vcpus)) > max {
            return Err(Error::TooManyVcpus { in_use, requested: vcpus, max });
        }
        Ok(())
    }

    /// Counts `id` as in flight (being created, or deleted when `deleting`).
    pub fn reserve(&mut self, id: &str, vcpus: u32, mem_bytes: u64, deleting: bool) {
        self.pending.insert(id.to_string(), Pending { vcpus, mem_bytes, deleting });
    }

    /// `id` is no longer in flight.
    pub fn release(&mut self, id: &str) {
        self.pending.remove(id);
    }

    /// vCPUs of the VMs in flight.
    pub fn pending_vcpus(&self) -> u64 {
        self.pending.values().map(|p| u64::from(p.vcpus)).sum()
    }

    /// Guest memory of the VMs in flight, in bytes.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.values().map(|p| p.mem_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxima_count_the_vms_in_flight() {
        let mut a = Admission::default();
        a.set_limits(Limits { max_vms: 2, max_vcpus: 4 });
        assert!(a.check(2, 0, 0).is_ok());
        assert!(matches!(a.check(5, 0, 0), Err(e @ Error::VmOverVcpuLimit { .. }) if e.is_invalid_input()));
        a.reserve("a", 2, 1 << 20, false);
        assert!(matches!(a.check_idle("a"), Err(Error::Busy { what: "created", .. })));
        assert!(a.check_idle("b").is_ok());
        let e = a.check(3, 0, 0).expect_err("2 + 3 > 4 vCPUs");
        assert!(matches!(e, Error::TooManyVcpus { in_use: 2, requested: 3, max: 4 }), "{e}");
        assert!(!e.is_invalid_input());
        assert!(matches!(a.check(1, 1, 1), Err(Error::TooManyVms { in_use: 2, max: 2 })));
        assert_eq!((a.pending_vcpus(), a.pending_bytes()), (2, 1 << 20));
        a.release("a");
        a.reserve("a", 1, 0, true);
        assert!(matches!(a.check_idle("a"), Err(Error::Busy { what: "deleted", .. })));
        a.release("a");
        assert!(a.check(2, 1, 2).is_ok());
    }

    #[test]
    fn defaults_fit_the_fds() {
        let l = Limits::defaults_for(1 << 20, 2);
        assert_eq!((l.max_vms, l.max_vcpus), (128, 128));
        assert!(l.fds_needed() <= FDS_BASE + (1 << 20));
        // Few fds: the maxima shrink so that they still fit.
        let l = Limits::defaults_for(130, 64);
        assert_eq!(l.max_vms, 10);
        assert!(l.fds_needed() <= FDS_BASE + 130, "{l:?}");
        assert!(l.max_vcpus >= 10);
        assert!(Limits::default().fds_needed() == u64::MAX);
        // A host with many CPUs and fds: no more VMs than the guest-range table holds.
        let l = Limits::defaults_for(1 << 30, 1024);
        assert_eq!(l.max_vms, MAX_VMS, "{l:?}");
    }
}
