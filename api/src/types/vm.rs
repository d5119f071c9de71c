//! Per-VM request and response types: `PUT /vms/{vm_id}`, `GET /vms[/{vm_id}]`,
//! `PUT /vms/{vm_id}/actions`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_range, BalloonSpec, Error, Validate};
use crate::scenario::{self, Scenario};

/// Life-cycle state of a VM: the VMM's [`vmm::vm::VmState`].
pub use vmm::vm::VmState;

/// Largest number of vCPUs a VM may have.
pub const MAX_VCPU_COUNT: u32 = 32;
/// Largest guest memory size (MiB).
pub const MAX_MEM_SIZE_MIB: u32 = 65536;
/// Longest VM id (and merge domain name).
pub const MAX_VM_ID_LEN: usize = 64;
/// Longest kernel command line accepted, in bytes (x86 `COMMAND_LINE_SIZE`).
pub const MAX_BOOT_ARGS_LEN: usize = 2048;
/// Longest host path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Checks a VM id (or merge domain name): 1..=64 characters of `[A-Za-z0-9_-]`.
pub fn validate_vm_id(field: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_VM_ID_LEN {
        return Err(Error::new(field, format!("must be 1..={MAX_VM_ID_LEN} characters long")));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(Error::new(field, format!("may only contain A-Z, a-z, 0-9, '_' and '-', found {c:?}")));
    }
    Ok(())
}

fn validate_path(field: &str, path: &str) -> Result<(), Error> {
    if path.is_empty() {
        return Err(Error::new(field, "must not be empty"));
    }
    if path.contains('\0') {
        return Err(Error::new(field, "must not contain a NUL character"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Error::new(field, format!("must be at most {MAX_PATH_LEN} bytes long")));
    }
    Ok(())
}

/// Body of `PUT /vms/{vm_id}`: how to build a microVM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (1..=32).
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu_count: u32,
    /// Guest memory size in MiB (1..=65536).
    #[schema(minimum = 1, maximum = 65536)]
    pub mem_size_mib: u32,
    /// What the VM runs.
    pub boot: BootSource,
    /// File (e.g. a saved guest memory image) whose content initializes guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_image_path: Option<String>,
    /// Same-page merging of this VM's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeSettings>,
    /// A virtio-balloon device (configured before the VM starts, as in Firecracker;
    /// `PUT /vms/{vm_id}/balloon` sets it on a created VM too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonSpec>,
}

impl Validate for VmConfig {
    fn validate(&self) -> Result<(), Error> {
        check_range("vcpu_count", self.vcpu_count, 1, MAX_VCPU_COUNT)?;
        check_range("mem_size_mib", self.mem_size_mib, 1, MAX_MEM_SIZE_MIB)?;
        match &self.boot {
            BootSource::Workload(s) => {
                s.validate().map_err(|e| match e {
                    scenario::Error::Range { field, reason } => Error::new(format!("boot.workload.{field}"), reason),
                    other => Error::new("boot.workload", other.to_string()),
                })?;
                if s.fill_mib > self.mem_size_mib {
                    return Err(Error::new(
                        "boot.workload.fill_mib",
                        format!("must not exceed mem_size_mib ({} > {})", s.fill_mib, self.mem_size_mib),
                    ));
                }
            }
            BootSource::Kernel(k) => k.validate()?,
        }
        if let Some(p) = &self.memory_image_path {
            validate_path("memory_image_path", p)?;
        }
        if let Some(m) = &self.merge {
            if let Some(d) = &m.domain {
                validate_vm_id("merge.domain", d)?;
            }
        }
        if let Some(b) = &self.balloon {
            if b.amount_mib > self.mem_size_mib {
                return Err(Error::new(
                    "balloon.amount_mib",
                    format!("must not exceed mem_size_mib ({} > {})", b.amount_mib, self.mem_size_mib),
                ));
            }
        }
        Ok(())
    }
}

/// What a VM boots: exactly one of `workload` or `kernel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum BootSource {
    /// The built-in workload guest (64-bit CPL-3 code) running a scenario.
    Workload(Scenario),
    /// A Linux kernel (needs a host that runs ring-0 guests natively).
    Kernel(KernelBoot),
}

/// A Linux kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    /// Path of the kernel image (ELF vmlinux or bzImage) on the host.
    pub kernel_image_path: String,
    /// Path of an initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl Validate for KernelBoot {
    fn validate(&self) -> Result<(), Error> {
        validate_path("boot.kernel.kernel_image_path", &self.kernel_image_path)?;
        if let Some(p) = &self.initrd_path {
            validate_path("boot.kernel.initrd_path", p)?;
        }
        if let Some(a) = &self.boot_args {
            if a.len() > MAX_BOOT_ARGS_LEN || a.contains('\0') {
                return Err(Error::new(
                    "boot.kernel.boot_args",
                    format!("must be at most {MAX_BOOT_ARGS_LEN} bytes without NUL"),
                ));
            }
        }
        Ok(())
    }
}

/// Per-VM merge settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeSettings {
    /// Whether this VM's pages take part in same-page merging.
    pub enabled: bool,
    /// Merge domain, declared first with `PUT /domains/{domain_name}` (an undeclared
    /// domain is refused, 400): the VM shares frames with the other VMs of the
    /// domain if its policy has `merge_across_vms`. Absent: the VM is alone in a
    /// domain of its own (its pages merge only with each other). Same character
    /// rules as a VM id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// Phase of the workload guest, as it last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WorkloadPhase {
    /// Not started yet (or no report so far).
    Starting,
    /// Filling memory with the scenario's content (and verifying it once).
    Filling,
    /// Running the write loop (rewrites and rolling verification).
    Writing,
    /// Finished: the final verify is done and every page held what was last written.
    Done,
    /// A page did not hold what the guest last wrote (see `mismatches`).
    Failed,
}

/// What a workload guest reported about its progress (summed over its vCPUs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadReport {
    /// Current phase.
    pub phase: WorkloadPhase,
    /// Data pages the guest fills (`fill_mib` in 4 KiB pages).
    pub data_pages: u64,
    /// Pages filled so far.
    pub pages_filled: u64,
    /// Page rewrites done by the write loop so far.
    pub pages_written: u64,
    /// Page verifications done so far.
    pub pages_verified: u64,
    /// Complete verification passes over every data page (the fewest of any vCPU).
    pub full_verifies: u64,
    /// Pages whose content did not match what the guest wrote.
    pub mismatches: u64,
    /// Index of the first page that did not verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<u64>,
    /// Milliseconds the fill (and its first verify) took, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_ms: Option<f64>,
    /// Milliseconds from the guest's start to its last report update.
    pub elapsed_ms: f64,
}

/// `GET /vms/{vm_id}`: a VM's state and configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// The VM's id.
    pub vm_id: String,
    /// Life-cycle state.
    pub state: VmState,
    /// The configuration it was created with.
    pub config: VmConfig,
    /// Progress of the workload guest (workload VMs; phase `Starting` until it first reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadReport>,
    /// Why the VM exited (state `Exited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
}

/// `GET /vms`: every VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmList {
    /// The VMs, in the VMM's order.
    pub vms: Vec<VmInfo>,
}

/// Actions on a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmActionType {
    /// Start the vCPUs of a `Created` VM.
    InstanceStart,
    /// Pause a `Running` VM.
    Pause,
    /// Resume a `Paused` VM.
    Resume,
    /// Stop a VM for good (its memory stays until `DELETE`).
    Stop,
}

/// Body of `PUT /vms/{vm_id}/actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmActionRequest {
    /// The action to perform.
    pub action_type: VmActionType,
}

impl Validate for VmActionRequest {
    fn validate(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(mem: u32, fill: u32) -> VmConfig {
        VmConfig {
            vcpu_count: 1,
            mem_size_mib: mem,
            boot: BootSource::Workload(Scenario { fill_mib: fill, ..Scenario::default() }),
            memory_image_path: None,
            merge: None,
            balloon: None,
        }
    }

    #[test]
    fn vm_ids() {
        assert!(validate_vm_id("vm_id", "vm-1_A").is_ok());
        assert!(validate_vm_id("vm_id", &"a".repeat(64)).is_ok());
        for bad in ["", "a.b", "a/b", "é", &"a".repeat(65)] {
            assert!(validate_vm_id("vm_id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_ranges() {
        assert!(workload(128, 64).validate().is_ok());
        let e = workload(32, 64).validate().unwrap_err();
        assert_eq!(e.field, "boot.workload.fill_mib");
        let mut c = workload(128, 64);
        c.vcpu_count = 33;
        assert_eq!(c.validate().unwrap_err().field, "vcpu_count");
        c.vcpu_count = 1;
        c.mem_size_mib = 65537;
        assert_eq!(c.validate().unwrap_err().field, "mem_size_mib");
        let c = workload(128, 0);
        assert_eq!(c.validate().unwrap_err().field, "boot.workload.fill_mib");
    }

    #[test]
    fn boot_source_json() {
        let c: VmConfig = serde_json::from_str(
            r#"{"vcpu_count":2,"mem_size_mib":256,
                "boot":{"kernel":{"kernel_image_path":"/k","boot_args":"console=ttyS0"}},
                "merge":{"enabled":true,"domain":"d1"}}"#,
        )
        .unwrap();
        assert!(c.validate().is_ok());
        assert!(matches!(c.boot, BootSource::Kernel(_)));
        let both = r#"{"vcpu_count":1,"mem_size_mib":64,
            "boot":{"workload":{},"kernel":{"kernel_image_path":"/k"}}}"#;
        assert!(serde_json::from_str::<VmConfig>(both).is_err());
        let unknown = r#"{"vcpu_count":1,"mem_size_mib":64,"boot":{"workload":{}},"x":1}"#;
        assert!(serde_json::from_str::<VmConfig>(unknown).is_err());
    }
}
