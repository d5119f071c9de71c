//! The API server's allow-list (its accept thread and the tokio runtime's
//! threads): epoll, accepting and serving connections, tokio's own wake-ups and
//! blocking-pool threads, and what reading the memory statistics takes (`fstat`
//! of the pool's memfd, for `GET /memory`). No KVM or userfaultfd ioctl, no file
//! opening or path lookup, no exec.

use super::rules::{self, Rules};

/// `FIONBIO`: set a socket non-blocking.
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX`: set close-on-exec.
const FIOCLEX: u64 = 0x5451;

/// The allow-list of an API server thread.
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::spawning());
    rules::allow(
        &mut r,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_create1,
            libc::SYS_eventfd2,
            libc::SYS_accept4,
            libc::SYS_accept,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_readv,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_fcntl,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fstat,
        ],
    );
    rules::allow_ioctl_requests(&mut r, &[FIONBIO, FIOCLEX]);
    r
}
