//! The host memory budget policy of the balloons for the API
//! (`GET|PATCH /memory/balloon-policy`) and its timer.
//!
//! The policy ([`vmm::balloon::BalloonPolicy`]) lives in the bridge; the daemon's
//! event loop calls [`tick`] after every round (it wakes at least every 200 ms),
//! and a step runs when `interval_ms` has elapsed since the last. A step reads
//! the frame pool's host memory in use and the running VMs' balloons, and sets
//! new targets through the Host (their drivers hear of it through the
//! configuration-change interrupt).

use std::time::Instant;

use api::types::{BalloonPolicyPatch, BalloonPolicyStatus};
use api::{ApiError, ApiReply};
use vmm::balloon::BalloonPolicy;
use vmm::host::Host;

/// The policy's settings and state, with the pool's use now.
pub fn status(policy: &BalloonPolicy, host: &Host) -> BalloonPolicyStatus {
    policy.status(host.memory().stats().host_bytes)
}

/// `GET /memory/balloon-policy`.
pub fn get(policy: &BalloonPolicy, host: &Host) -> ApiReply {
    ApiReply::BalloonPolicy(Box::new(status(policy, host)))
}

/// `PATCH /memory/balloon-policy`: applies `patch` (all or nothing; the next step
/// runs at once) and answers with the policy.
pub fn patch(policy: &mut BalloonPolicy, host: &Host, patch: &BalloonPolicyPatch) -> Result<ApiReply, ApiError> {
    let c = policy.update(patch).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match c.host_budget_mib {
        Some(mib) => tracing::info!(
            "balloon policy: budget {mib} MiB, at most {} MiB per step every {} ms, margin {} MiB",
            c.max_step_mib,
            c.interval_ms,
            c.margin_mib
        ),
        None => tracing::info!("balloon policy: off (the targets it set stay)"),
    }
    Ok(get(policy, host))
}

/// Runs a policy step on `host` if one is due now.
pub fn tick(policy: &mut BalloonPolicy, host: &Host) {
    policy.tick(host, Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_patches_are_400_and_change_nothing() {
        let mut p = BalloonPolicy::default();
        let before = p.config();
        let bad: BalloonPolicyPatch = serde_json::from_str(r#"{"host_budget_mib": 64, "interval_ms": 5}"#).unwrap();
        let e = p.update(&bad).map_err(|e| ApiError::bad_request(e.to_string())).unwrap_err();
        assert_eq!(e.kind, api::ErrorKind::BadRequest);
        assert_eq!(e.fault_message, "interval_ms: must be in 200..=600000, got 5");
        assert_eq!(p.config(), before);
    }
}
