//! Balloon request and response types, shaped like Firecracker's balloon API:
//! `PUT|PATCH|GET /vms/{vm_id}/balloon`, `GET|PATCH /vms/{vm_id}/balloon/statistics`;
//! and the host memory budget policy, `GET|PATCH /memory/balloon-policy`.
//!
//! The balloon's settings, size and statistics are the VMM's types
//! ([`vmm::balloon`]), re-exported here; only the PATCH bodies and the `GET`
//! answer (settings and size with the counters) are the API's own.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_range, Error, Validate, MAX_MEM_SIZE_MIB};

/// Settings, target and actual size of a balloon: the VMM's [`vmm::balloon::BalloonInfo`].
pub use vmm::balloon::BalloonInfo;
/// What a balloon did: the VMM's [`vmm::balloon::BalloonReport`].
pub use vmm::balloon::BalloonReport;
/// A VM's balloon settings (body of `PUT /vms/{vm_id}/balloon` and the `balloon`
/// object of `PUT /vms/{vm_id}`): the VMM's [`vmm::balloon::BalloonSpec`].
pub use vmm::balloon::BalloonSpec;
/// `GET /vms/{vm_id}/balloon/statistics`: the VMM's [`vmm::balloon::BalloonStatistics`].
pub use vmm::balloon::BalloonStatistics;
/// The budget policy's settings, the body of `PATCH /memory/balloon-policy`, the
/// answer of `GET|PATCH /memory/balloon-policy` and its parts: the VMM's
/// [`vmm::balloon::policy`] types.
pub use vmm::balloon::{
    BalloonPolicyAction, BalloonPolicyConfig, BalloonPolicyPatch, BalloonPolicyStatus, BalloonTargetChange, PolicyBand,
};

impl Validate for BalloonSpec {
    fn validate(&self) -> Result<(), Error> {
        // The VMM checks the amount against the VM's own memory size.
        check_range("amount_mib", self.amount_mib, 0, MAX_MEM_SIZE_MIB)
    }
}

impl Validate for BalloonPolicyPatch {
    /// The policy's own range check ([`vmm::balloon::BalloonPolicyPatch::validate`]),
    /// with the API's error shape.
    fn validate(&self) -> Result<(), Error> {
        BalloonPolicyPatch::validate(self).map_err(|e| match e {
            vmm::balloon::policy::Error::OutOfRange { field, value, min, max } => {
                Error::new(field, format!("must be in {min}..={max}, got {value}"))
            }
        })
    }
}

/// Body of `PATCH /vms/{vm_id}/balloon`: a new target for a running balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// Target size of the balloon in MiB (at most the VM's memory).
    #[schema(minimum = 0, maximum = 65536)]
    pub amount_mib: u32,
}

impl Validate for BalloonUpdate {
    fn validate(&self) -> Result<(), Error> {
        check_range("amount_mib", self.amount_mib, 0, MAX_MEM_SIZE_MIB)
    }
}

/// Body of `PATCH /vms/{vm_id}/balloon/statistics`: a new statistics polling interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics requests (1..=65535; statistics cannot be turned
    /// on or off once the balloon exists).
    #[schema(minimum = 1, maximum = 65535)]
    pub stats_polling_interval_s: u16,
}

impl Validate for BalloonStatsUpdate {
    fn validate(&self) -> Result<(), Error> {
        check_range("stats_polling_interval_s", self.stats_polling_interval_s, 1, u16::MAX)
    }
}

/// `GET /vms/{vm_id}/balloon`: the balloon's settings (with the current target),
/// its actual size, and its counters.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Balloon {
    /// Settings, target and actual size.
    #[serde(flatten)]
    pub info: BalloonInfo,
    /// What the balloon did since the VM was created.
    pub counters: BalloonReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let s: BalloonSpec = serde_json::from_str(
            r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1,"free_page_reporting":false}"#,
        )
        .unwrap();
        assert!(Validate::validate(&s).is_ok());
        assert_eq!(s.amount_mib, 64);
        assert!(serde_json::from_str::<BalloonSpec>(r#"{"amount_mib":1,"x":1}"#).is_err());
        let big = BalloonSpec { amount_mib: MAX_MEM_SIZE_MIB + 1, ..Default::default() };
        assert_eq!(Validate::validate(&big).unwrap_err().field, "amount_mib");
        let zero = BalloonStatsUpdate { stats_polling_interval_s: 0 };
        assert_eq!(zero.validate().unwrap_err().field, "stats_polling_interval_s");
        assert!(serde_json::from_str::<BalloonUpdate>(r#"{"amount_mib":-1}"#).is_err());
    }

    #[test]
    fn policy_patch() {
        let p: BalloonPolicyPatch = serde_json::from_str(r#"{"host_budget_mib": null, "max_step_mib": 8}"#).unwrap();
        assert!(Validate::validate(&p).is_ok());
        assert_eq!(p.host_budget_mib, Some(None));
        let p: BalloonPolicyPatch = serde_json::from_str(r#"{"interval_ms": 10}"#).unwrap();
        let e = Validate::validate(&p).unwrap_err();
        assert_eq!(e.to_string(), "interval_ms: must be in 200..=600000, got 10");
    }

    /// The ranges in the OpenAPI document (literals in the schema attributes) are
    /// the policy's limits.
    #[test]
    fn documented_policy_ranges_are_the_limits() {
        use vmm::balloon::policy::{MAX_BUDGET_MIB, MAX_INTERVAL_MS, MAX_MARGIN_MIB, MAX_STEP_MIB, MIN_INTERVAL_MS};
        let doc = serde_json::to_value(crate::openapi::openapi()).unwrap();
        for schema in ["BalloonPolicyConfig", "BalloonPolicyPatch"] {
            let p = &doc["components"]["schemas"][schema]["properties"];
            let range = |field: &str| (p[field]["minimum"].as_u64(), p[field]["maximum"].as_u64());
            assert_eq!(range("host_budget_mib"), (Some(1), Some(MAX_BUDGET_MIB)), "{schema}");
            assert_eq!(range("max_step_mib"), (Some(1), Some(u64::from(MAX_STEP_MIB))), "{schema}");
            assert_eq!(
                range("interval_ms"),
                (Some(u64::from(MIN_INTERVAL_MS)), Some(u64::from(MAX_INTERVAL_MS))),
                "{schema}"
            );
            assert_eq!(range("margin_mib"), (Some(0), Some(u64::from(MAX_MARGIN_MIB))), "{schema}");
        }
    }
}
