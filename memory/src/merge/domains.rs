//! Merge domains, per-VM merge settings and the dirty-page source a VMM plugs in.
//!
//! Merging across VMs leaks information (a write to a merged page is slower)
//! and helps Rowhammer placement, so every VM belongs to a merge domain (by
//! default its own id) and frames are shared only between VMs of one domain.
//! This is enforced by construction, twice: the merger's indexes are keyed by
//! domain (a lookup can only propose a frame of the same domain), and every
//! sharing operation ([`Txn::check_domain`]) refuses a frame mapped by a VM
//! of another domain. Zero pages share nothing (their memory is dropped) and
//! are handled in every domain.

use serde::Serialize;

use crate::frame_table::Mapper;
use crate::manager::{Core, Error, Result};
use crate::txn::Txn;
use crate::{FrameNo, VmId};

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

impl Txn<'_> {
    /// Fails with [`Error::CrossDomain`] unless every guest page mapping `frame`
    /// belongs to a VM of `vm`'s merge domain.
    pub(crate) fn check_domain(&self, vm: VmId, frame: FrameNo) -> Result<()> {
        let da = self.st.merge_config(vm).domain;
        let check = |m: &Mapper| {
            let db = self.st.merge_config(m.vm).domain;
            if db == da {
                Ok(())
            } else {
                Err(Error::CrossDomain { a: vm, da, b: m.vm, db })
            }
        };
        match self.st.frames.shared_mappers(frame) {
            Some(list) => list.iter().try_for_each(check),
            None => self.st.frames.first_mapper(frame).iter().try_for_each(check),
        }
    }
}

impl Core {
    /// Applies new merge settings to `vm`; leaving a domain or disabling
    /// merging first unmerges the VM (every page gets a private frame).
    pub(crate) fn set_merge(&self, vm: VmId, cfg: VmMergeConfig) -> Result<()> {
        let mut guard = self.lock();
        let mut t = Txn::new(&mut guard, self.remap());
        let len = t.st.vms.get(&vm).ok_or(Error::UnknownVm(vm))?.len();
        let old = t.st.merge_config(vm);
        if old.domain != cfg.domain || (old.enabled && !cfg.enabled) {
            let undone = t.unshare_range(vm, 0, len, true)?;
            tracing::debug!("VM {vm}: {undone} pages unmerged on leaving domain {}", old.domain);
        }
        t.st.merge_cfg.insert(vm, cfg);
        Ok(())
    }
}
