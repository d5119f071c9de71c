//! Per-VM merge settings kept by the core: merge domains, the enabled flag and
//! the dirty-page source a VMM plugs in (the merger reads them; see
//! [`crate::merge::domains`] for why domains exist).

use serde::Serialize;

use crate::VmId;

/// Identifier of a merge domain.
pub type DomainId = u32;

/// A source of "pages written since the last call" for one VM, plugged in by
/// the VMM (implemented with `KVM_GET_DIRTY_LOG` or the dirty ring). Host
/// threads that store into guest memory directly are not seen by KVM: they
/// must feed such a source themselves or the VM must use checksums.
pub trait DirtyLog: Send + Sync {
    /// Appends the dirty bitmap since the previous call to `out` (cleared by the
    /// caller): bit `p % 64` of word `p / 64` is guest page `p` (guest-physical
    /// address `p * 4096` of the VM's RAM). Missing words mean clean pages.
    fn take_dirty(&self, out: &mut Vec<u64>) -> std::result::Result<(), String>;
}

/// Merge settings of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmMergeConfig {
    /// The merger scans this VM.
    pub enabled: bool,
    /// Its merge domain.
    pub domain: DomainId,
}

impl VmMergeConfig {
    /// The settings of a VM that never chose: disabled, alone in its own domain.
    pub fn default_for(vm: VmId) -> Self {
        VmMergeConfig { enabled: false, domain: vm }
    }
}
