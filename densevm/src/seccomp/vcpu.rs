//! The vCPU threads' allow-list: `KVM_RUN` and the other KVM ioctls of the exit
//! loop, the devices' work on an exit (serial output, eventfd interrupts, timers),
//! and the memory manager's page operations that a device may start on the vCPU
//! thread (the balloon returning pages). No sockets, no exec, no file opened for
//! writing: files are opened read-only, and only on the rare path that reports an
//! exit the loop cannot handle (it reads the guest kernel's System.map to name the
//! function at RIP).

use super::rules::{self, Rules, IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD};

/// The allow-list of a vCPU thread.
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::memory_ops());
    rules::allow_ioctl_types(&mut r, &[IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD]);
    rules::allow(&mut r, &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime, libc::SYS_poll, libc::SYS_ppoll]);
    // Exit diagnostics: System.map, read-only.
    rules::allow_arg_masked(&mut r, libc::SYS_openat, 2, libc::O_ACCMODE as u64, libc::O_RDONLY as u64);
    // The checks `vmm::boot::boot_file` makes on the opened file (its file system and
    // its real path); openat2 is refused (EPERM: its flags cannot be checked here) and
    // boot_file falls back to a read-only openat with O_NOFOLLOW.
    rules::allow(
        &mut r,
        &[
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_fstatfs,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
        ],
    );
    r
}
