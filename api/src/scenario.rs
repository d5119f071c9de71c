//! Workload-guest scenario (the `workload` boot source of `PUT /vms/{vm_id}`): the
//! VMM's type, [`vmm::workload::scenario`], re-exported.

pub use vmm::workload::scenario::{
    Error, Scenario, MAX_BALLOON_HOLD_MS, MAX_DURATION_S, MAX_FILL_MIB, MAX_WRITES_PER_S,
};
