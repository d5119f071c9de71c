//! The vCPU threads' allow-list: `KVM_RUN` and the other KVM ioctls of the exit
//! loop, the devices' work on an exit (serial output, eventfd interrupts, timers),
//! and the memory manager's page operations that a device may start on the vCPU
//! thread (the balloon returning pages). No file opening, no sockets, no exec.

use super::rules::{self, Rules, IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD};

/// The allow-list of a vCPU thread.
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::memory_ops());
    rules::allow_ioctl_types(&mut r, &[IOCTL_TYPE_KVM, IOCTL_TYPE_UFFD]);
    rules::allow(&mut r, &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime, libc::SYS_poll, libc::SYS_ppoll]);
    r
}
