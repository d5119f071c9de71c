//! The merger's (scanner's) allow-list: the page operations of merging (remaps,
//! write protection, hole punching, residency checks) and reading the VMs' KVM
//! dirty logs (change detection); no other KVM ioctl.

use super::rules::{self, Rules};

/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
pub const KVM_GET_DIRTY_LOG: u64 = 0x4010_AE42;

/// The allow-list of the merger thread.
pub fn rules() -> Rules {
    let mut r = rules::union(rules::common(), rules::memory_ops());
    rules::allow_ioctl_requests(&mut r, &[KVM_GET_DIRTY_LOG]);
    r
}
