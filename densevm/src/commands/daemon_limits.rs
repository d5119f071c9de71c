//! The daemon's own limits, set at start: the maxima of VMs and vCPUs
//! (`serve --max-vms`, `--max-vcpus`), the open-files limit they need
//! (`RLIMIT_NOFILE`, soft raised to the hard limit; the daemon refuses to start
//! when the hard limit cannot hold the maxima and the API connections), and the
//! daemon's `oom_score_adj`.
//!
//! What a VM costs: [`FDS_PER_VM`] descriptors of its own and [`FDS_PER_VCPU`]
//! and [`THREADS_PER_VCPU`] per vCPU (see [`vmm::admission`]).

use vmm::admission::{Limits, FDS_BASE, FDS_PER_VCPU, FDS_PER_VM, THREADS_PER_VCPU, VCPUS_PER_HOST_CPU};

/// The daemon's default `oom_score_adj`: the kernel's OOM killer prefers other
/// processes until the daemon holds half of memory more than them, but may still
/// kill it as a last resort (-1000 would make it unkillable, and a memory cgroup
/// holding only the daemon could then not recover).
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -500;

/// Errors of setting the daemon's limits.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// getrlimit/setrlimit failed.
    #[error("RLIMIT_NOFILE: {0}")]
    Rlimit(std::io::Error),
    /// The hard open-files limit cannot hold the maxima.
    #[error(
        "the open-files hard limit (RLIMIT_NOFILE) is {hard}, but --max-vms {max_vms} and --max-vcpus {max_vcpus} \
         with {connections} API connections need up to {needed} file descriptors ({base} for the daemon, \
         {per_vm} per VM, {per_vcpu} per vCPU, 1 per connection): raise the hard limit (ulimit -Hn, or \
         LimitNOFILE= in a systemd unit) or lower --max-vms, --max-vcpus or --api-max-connections-*",
        base = FDS_BASE, per_vm = FDS_PER_VM, per_vcpu = FDS_PER_VCPU
    )]
    TooFewFds {
        /// The hard limit.
        hard: u64,
        /// Most VMs.
        max_vms: usize,
        /// Most vCPUs.
        max_vcpus: u64,
        /// Most API connections (Unix socket and TCP).
        connections: u64,
        /// Descriptors needed.
        needed: u64,
    },
    /// Writing /proc/self/oom_score_adj failed.
    #[error("cannot set oom_score_adj to {value}: {source}")]
    OomScoreAdj {
        /// The value.
        value: i32,
        /// Cause.
        source: std::io::Error,
    },
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new limit.
pub fn raise_nofile() -> Result<u64, Error> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(Error::Rlimit(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit with a valid rlimit whose soft value is the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(Error::Rlimit(std::io::Error::last_os_error()));
        }
    }
    Ok(lim.rlim_max)
}

/// The maxima for `--max-vms` and `--max-vcpus` (each `None`: its default) with
/// `connections` API connections at most and `hard` file descriptors, on a host
/// of `cpus` CPUs. Defaults: [`VCPUS_PER_HOST_CPU`] vCPUs per host CPU and as
/// many VMs, both cut down to what the descriptors hold; the maxima given are
/// refused when the descriptors cannot hold them.
pub fn resolve(
    max_vms: Option<usize>,
    max_vcpus: Option<u64>,
    connections: u64,
    hard: u64,
    cpus: u64,
) -> Result<Limits, Error> {
    let avail = hard.saturating_sub(FDS_BASE).saturating_sub(connections);
    let defaults = Limits::defaults_for(avail, cpus);
    let vms = match (max_vms, max_vcpus) {
        (Some(v), _) => v,
        // More VMs than vCPUs cannot exist.
        (None, Some(c)) => defaults.max_vms.min(usize::try_from(c).unwrap_or(usize::MAX)),
        (None, None) => defaults.max_vms,
    };
    let vcpus = max_vcpus.unwrap_or_else(|| {
        let vms64 = u64::try_from(vms).unwrap_or(u64::MAX);
        let left = avail.saturating_sub(vms64.saturating_mul(FDS_PER_VM)) / FDS_PER_VCPU;
        cpus.max(1).saturating_mul(VCPUS_PER_HOST_CPU).min(left).max(vms64)
    });
    let limits = Limits { max_vms: vms, max_vcpus: vcpus };
    let needed = limits.fds_needed().saturating_add(connections);
    if needed > hard {
        return Err(Error::TooFewFds { hard, max_vms: vms, max_vcpus: vcpus, connections, needed });
    }
    Ok(limits)
}

/// Host CPUs this process may run on.
pub fn host_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// What the maxima cost, for the start-up log.
pub fn describe(limits: &Limits, hard: u64) -> String {
    format!(
        "at most {} VMs and {} vCPUs (a VM costs {FDS_PER_VM} fds, a vCPU {FDS_PER_VCPU} fd and {THREADS_PER_VCPU} \
         thread; up to {} fds of the {hard} RLIMIT_NOFILE)",
        limits.max_vms,
        limits.max_vcpus,
        limits.fds_needed()
    )
}

/// Sets this process's `oom_score_adj`.
pub fn set_oom_score_adj(value: i32) -> Result<(), Error> {
    std::fs::write("/proc/self/oom_score_adj", value.to_string()).map_err(|source| Error::OomScoreAdj { value, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxima_default_to_what_the_fds_hold_and_are_checked() {
        let l = resolve(None, None, 640, 20000, 2).expect("defaults fit");
        assert_eq!((l.max_vms, l.max_vcpus), (128, 128));
        let l = resolve(Some(1000), None, 640, 20000, 2).expect("1000 VMs fit in 20000 fds");
        assert_eq!(l.max_vms, 1000);
        assert!(l.max_vcpus >= 1000 && l.fds_needed() + 640 <= 20000, "{l:?}");
        let l = resolve(None, Some(8), 640, 20000, 2).expect("8 vCPUs fit");
        assert_eq!((l.max_vms, l.max_vcpus), (8, 8));
        // A small hard limit shrinks the defaults and refuses big maxima.
        let l = resolve(None, None, 640, 1024, 64).expect("defaults fit a small limit");
        assert!(l.fds_needed() + 640 <= 1024 && l.max_vms >= 1, "{l:?}");
        let e = resolve(Some(1000), None, 640, 1024, 2).expect_err("1000 VMs need more than 1024 fds");
        let msg = e.to_string();
        assert!(msg.contains("RLIMIT_NOFILE) is 1024") && msg.contains("--max-vms 1000"), "{msg}");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let hard = raise_nofile().expect("getrlimit");
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit with a valid, writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, lim.rlim_max), (hard, hard));
    }
}
