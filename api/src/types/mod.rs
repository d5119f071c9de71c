//! Wire types of the HTTP API: request bodies, response bodies and their validation.
//!
//! Every request type rejects unknown fields (`#[serde(deny_unknown_fields)]`) and has a
//! [`Validate`] implementation that checks value ranges; the server answers 400 with the
//! message of the first violation.

mod balloon;
mod domain;
mod memory;
mod vm;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use balloon::{
    Balloon, BalloonInfo, BalloonPolicyAction, BalloonPolicyConfig, BalloonPolicyPatch, BalloonPolicyStatus,
    BalloonReport, BalloonSpec, BalloonStatistics, BalloonStatsUpdate, BalloonTargetChange, BalloonUpdate, PolicyBand,
};
pub use domain::{DomainInfo, DomainList, DomainPolicy, MAX_DOMAIN_VMS};
pub use memory::{
    ChangeDetection, CompactionActionRequest, CompactionActionType, CompactionConfig, CompactionConfigPatch,
    CompactionFailures, CompactionReport, CompactionStats, CompactionTiming, HostMemoryStats, MergeActionRequest,
    MergeActionType, MergeConfig, MergeConfigPatch, VmMemoryStats, MAX_MAX_PAGES_PER_S, MAX_MAX_PAGE_SHARING,
    MAX_PAGES_TO_SCAN, MAX_PROACTIVENESS, MAX_SLEEP_MS, MIN_MAX_PAGES_PER_S, MIN_MAX_PAGE_SHARING,
};
pub use vm::{
    validate_vm_id, BootSource, KernelBoot, MergeSettings, VmActionRequest, VmActionType, VmConfig, VmInfo, VmList,
    VmState, WorkloadPhase, WorkloadReport, MAX_BOOT_ARGS_LEN, MAX_MEM_SIZE_MIB, MAX_PATH_LEN, MAX_VCPU_COUNT,
    MAX_VM_ID_LEN,
};

/// A value that is out of its allowed range (or otherwise semantically invalid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Error {
    /// Dotted path of the offending field (e.g. `boot.workload.fill_mib`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Error {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error { field: field.into(), reason: reason.into() }
    }
}

/// Range and consistency checks run on a request body after it was parsed.
pub trait Validate {
    /// Returns the first violation found, if any.
    fn validate(&self) -> Result<(), Error>;
}

/// Checks that `value` lies in `min..=max`.
pub(crate) fn check_range<T>(field: &str, value: T, min: T, max: T) -> Result<(), Error>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(Error::new(field, format!("must be in {min}..={max}, got {value}")));
    }
    Ok(())
}

/// Body of every error response, as in Firecracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultResponse {
    /// Human-readable description of what went wrong.
    pub fault_message: String,
}

/// `GET /`: version of densevm and facts about the host, filled in by the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InfoReply {
    /// densevm version.
    pub version: String,
    /// Whether `/dev/kvm` could be opened.
    pub kvm: bool,
    /// `KVM_GET_API_VERSION` (0 when KVM is unavailable).
    pub kvm_api_version: i32,
    /// userfaultfd features the kernel offers (e.g. `WP_HUGETLBFS_SHMEM`).
    pub userfaultfd_features: Vec<String>,
    /// Whether ring-0 guests (a stock Linux kernel) run natively on this host.
    pub ring0_native: bool,
    /// Why `ring0_native` has its value.
    pub ring0_reason: String,
}
