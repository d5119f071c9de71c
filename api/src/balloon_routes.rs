//! The balloon routes, shaped like Firecracker's: `PUT|PATCH|GET
//! /vms/{vm_id}/balloon`, `GET|PATCH /vms/{vm_id}/balloon/statistics`, and the
//! host memory budget policy `GET|PATCH /memory/balloon-policy`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::channel::{ApiAction, ApiReply};
use crate::error::Error;
use crate::extract::{JsonBody, VmId};
use crate::routes::empty;
use crate::state::{unexpected, AppState};
use crate::types::{
    Balloon, BalloonPolicyPatch, BalloonPolicyStatus, BalloonSpec, BalloonStatistics, BalloonStatsUpdate,
    BalloonUpdate, FaultResponse,
};

/// Configures the balloon of a VM that is created but not started (as Firecracker
/// does before boot); replaces the settings of one it has.
#[utoipa::path(put, path = "/vms/{vm_id}/balloon", tag = "balloon",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = BalloonSpec,
    responses(
        (status = 204, description = "Balloon configured"),
        (status = 400, description = "Invalid id or body, or a balloon larger than the VM", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
        (status = 409, description = "The VM has started: a balloon is configured before boot", body = FaultResponse),
    ))]
async fn put_balloon(
    State(s): State<AppState>,
    VmId(vm_id): VmId,
    JsonBody(spec): JsonBody<BalloonSpec>,
) -> Result<StatusCode, Error> {
    empty(&s, ApiAction::PutBalloon { vm_id, spec }).await
}

/// Sets a new balloon target; the guest's driver inflates or deflates towards it.
#[utoipa::path(patch, path = "/vms/{vm_id}/balloon", tag = "balloon",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = BalloonUpdate,
    responses(
        (status = 204, description = "Target set"),
        (status = 400, description = "Invalid id or body, a target larger than the VM, or no balloon",
            body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn patch_balloon(
    State(s): State<AppState>,
    VmId(vm_id): VmId,
    JsonBody(u): JsonBody<BalloonUpdate>,
) -> Result<StatusCode, Error> {
    empty(&s, ApiAction::PatchBalloon { vm_id, amount_mib: u.amount_mib }).await
}

/// The balloon's settings, target and actual size (MiB and pages) and counters.
#[utoipa::path(get, path = "/vms/{vm_id}/balloon", tag = "balloon",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The balloon", body = Balloon),
        (status = 400, description = "Invalid id, or the VM has no balloon", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn get_balloon(State(s): State<AppState>, VmId(id): VmId) -> Result<Json<Balloon>, Error> {
    match s.call(ApiAction::GetBalloon(id)).await? {
        ApiReply::Balloon(b) => Ok(Json(*b)),
        other => Err(unexpected("GetBalloon", &other)),
    }
}

/// The guest's latest memory statistics (the virtio spec's tags, absent until the
/// driver sends them) with their timestamp, and the balloon's target and actual size.
#[utoipa::path(get, path = "/vms/{vm_id}/balloon/statistics", tag = "balloon",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The statistics", body = BalloonStatistics),
        (status = 400, description = "Invalid id, the VM has no balloon, or its statistics are off",
            body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn get_balloon_statistics(State(s): State<AppState>, VmId(id): VmId) -> Result<Json<BalloonStatistics>, Error> {
    match s.call(ApiAction::GetBalloonStatistics(id)).await? {
        ApiReply::BalloonStatistics(b) => Ok(Json(*b)),
        other => Err(unexpected("GetBalloonStatistics", &other)),
    }
}

/// Changes the statistics polling interval (statistics must have been enabled).
#[utoipa::path(patch, path = "/vms/{vm_id}/balloon/statistics", tag = "balloon",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = BalloonStatsUpdate,
    responses(
        (status = 204, description = "Interval set"),
        (status = 400, description = "Invalid id or body, the VM has no balloon, or its statistics are off",
            body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn patch_balloon_statistics(
    State(s): State<AppState>,
    VmId(vm_id): VmId,
    JsonBody(u): JsonBody<BalloonStatsUpdate>,
) -> Result<StatusCode, Error> {
    let stats_polling_interval_s = u.stats_polling_interval_s;
    empty(&s, ApiAction::PatchBalloonStatistics { vm_id, stats_polling_interval_s }).await
}

/// The host memory budget policy of the balloons: its settings, where the pool's
/// use stands against the budget, the targets it set and its last action.
#[utoipa::path(get, path = "/memory/balloon-policy", tag = "balloon",
    responses(
        (status = 200, description = "The policy", body = BalloonPolicyStatus),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_balloon_policy(State(s): State<AppState>) -> Result<Json<BalloonPolicyStatus>, Error> {
    match s.call(ApiAction::GetBalloonPolicy).await? {
        ApiReply::BalloonPolicy(p) => Ok(Json(*p)),
        other => Err(unexpected("GetBalloonPolicy", &other)),
    }
}

/// Changes the budget policy's settings (`host_budget_mib: null` turns it off;
/// the targets it set stay); answers with the policy.
#[utoipa::path(patch, path = "/memory/balloon-policy", tag = "balloon",
    request_body = BalloonPolicyPatch,
    responses(
        (status = 200, description = "The policy after the change", body = BalloonPolicyStatus),
        (status = 400, description = "Invalid body", body = FaultResponse),
    ))]
async fn patch_balloon_policy(
    State(s): State<AppState>,
    JsonBody(patch): JsonBody<BalloonPolicyPatch>,
) -> Result<Json<BalloonPolicyStatus>, Error> {
    match s.call(ApiAction::PatchBalloonPolicy(patch)).await? {
        ApiReply::BalloonPolicy(p) => Ok(Json(*p)),
        other => Err(unexpected("PatchBalloonPolicy", &other)),
    }
}

/// Adds the balloon routes to `router`.
pub(crate) fn add(router: OpenApiRouter<AppState>) -> OpenApiRouter<AppState> {
    router
        .routes(routes!(get_balloon, put_balloon, patch_balloon))
        .routes(routes!(get_balloon_statistics, patch_balloon_statistics))
        .routes(routes!(get_balloon_policy, patch_balloon_policy))
}
