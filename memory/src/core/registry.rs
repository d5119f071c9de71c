//! Per-VM registrations of the core (`impl Core`): merge settings, the VMM's
//! dirty-page sources and vCPU gates.

use std::sync::Arc;

use super::error::{Error, Result};
use super::merge_settings::{DirtyLog, VmMergeConfig};
use super::txn::Txn;
use super::Core;
use crate::vcpu_gate::VcpuGate;
use crate::VmId;

impl Core {
    /// Applies new merge settings to `vm`; leaving a domain or disabling
    /// merging first unmerges the VM (every page gets a private frame).
    pub(crate) fn set_merge(&self, vm: VmId, cfg: VmMergeConfig) -> Result<()> {
        let mut guard = self.lock();
        let mut t = Txn::new(&mut guard, self.remap());
        let len = t.st.table(vm).ok_or(Error::UnknownVm(vm))?.len();
        let old = t.st.merge_config(vm);
        if old.domain != cfg.domain || (old.enabled && !cfg.enabled) {
            let undone = t.unshare_range(vm, 0, len, true)?;
            tracing::debug!("VM {vm}: {undone} pages unmerged on leaving domain {}", old.domain);
        }
        t.st.set_merge_config(vm, cfg);
        Ok(())
    }

    /// The merge settings of `vm`.
    pub(crate) fn merge_config(&self, vm: VmId) -> Result<VmMergeConfig> {
        let st = self.lock();
        if !st.has_vm(vm) {
            return Err(Error::UnknownVm(vm));
        }
        Ok(st.merge_config(vm))
    }

    /// Registers the dirty-page source of `vm` (replacing an earlier one).
    pub(crate) fn set_dirty_log(&self, vm: VmId, log: Box<dyn DirtyLog>) -> Result<()> {
        if !self.lock().has_vm(vm) {
            return Err(Error::UnknownVm(vm));
        }
        self.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).insert(vm, Arc::from(log));
        Ok(())
    }

    /// Removes the dirty-page source of `vm`.
    pub(crate) fn clear_dirty_log(&self, vm: VmId) {
        self.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).remove(&vm);
    }

    /// The dirty-page source of `vm`, if one is registered.
    pub(crate) fn dirty_log(&self, vm: VmId) -> Option<Arc<dyn DirtyLog>> {
        self.dirty_logs.lock().unwrap_or_else(|e| e.into_inner()).get(&vm).cloned()
    }

    /// Registers the vCPU gate of `vm` (replacing an earlier one).
    pub(crate) fn set_vcpu_gate(&self, vm: VmId, gate: Box<dyn VcpuGate>) -> Result<()> {
        if !self.lock().has_vm(vm) {
            return Err(Error::UnknownVm(vm));
        }
        self.vcpu_gates.lock().unwrap_or_else(|e| e.into_inner()).insert(vm, Arc::from(gate));
        Ok(())
    }

    /// Every registered vCPU gate.
    pub(crate) fn vcpu_gates(&self) -> Vec<Arc<dyn VcpuGate>> {
        self.vcpu_gates.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }
}
