//! The userfaultfd fault handler's allow-list: waiting on the userfaultfd and its
//! stop eventfd, reading fault events, and resolving them (copy-on-write remaps,
//! write-protect and wake ioctls).

use super::rules::{self, Rules};

/// The allow-list of the fault-handler thread.
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::memory_ops());
    rules::allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
    r
}
