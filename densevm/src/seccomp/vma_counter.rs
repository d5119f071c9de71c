//! The mapping counter's allow-list: reading `/proc/self/maps` (open, stat, read,
//! close) and parking between counts; nothing else.

use super::rules::{self, Rules};

/// The allow-list of the `densevm-vmacount` thread.
pub fn rules() -> Rules {
    let mut r = rules::common();
    rules::allow(&mut r, &[libc::SYS_openat, libc::SYS_statx, libc::SYS_fstat, libc::SYS_lseek]);
    r
}
