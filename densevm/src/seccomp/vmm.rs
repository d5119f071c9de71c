//! The VMM event loop's allow-list (the daemon's main thread once set up, and
//! `densevm run`'s driving thread). Threads spawned by it (vCPU threads, the API
//! bridge's helper threads) inherit its filter and stack their own, so this list is
//! the union of its own needs and those of every thread it spawns.
//!
//! Its own: loading kernels and initrds (open, stat, read, memfd), creating VMs
//! (KVM and userfaultfd ioctls, eventfds, timerfds), epoll, signalling vCPU threads,
//! statistics (mincore, /proc reads), and removing the API socket at exit.

use super::rules::{self, Rules, IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD};

/// `TCGETS`: is-a-terminal checks.
const TCGETS: u64 = 0x5401;
/// `FIONBIO`: set an fd non-blocking.
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX`: set close-on-exec.
const FIOCLEX: u64 = 0x5451;

/// The allow-list of the event-loop thread (including what its children need).
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::spawning());
    r = rules::union(r, rules::memory_ops());
    r = rules::union(r, super::vcpu::rules());
    rules::allow_ioctl_types(&mut r, &[IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD]);
    rules::allow_ioctl_requests(&mut r, &[TCGETS, FIONBIO, FIOCLEX]);
    rules::allow(
        &mut r,
        &[
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_open,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_statfs,
            libc::SYS_fstatfs,
            libc::SYS_lseek,
            libc::SYS_readv,
            libc::SYS_getdents64,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_dup3,
            libc::SYS_memfd_create,
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_rt_sigaction,
            libc::SYS_kill,
            libc::SYS_sysinfo,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_flock,
        ],
    );
    r
}
